#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Helper for tests/bench/cache-read.sh (standard library only).

  cache_report.py sanlog LOG OUT
      Reduce an nbdkit log-filter file (the "SAN"'s, written with TZ=UTC) to
      OUT: one line per millisecond that saw requests arrive,
      "EPOCH_MS READ_OPS READ_BYTES WRITE_OPS WRITE_BYTES OTHER_OPS", plus a
      "# total ..." line with the lifetime totals and the count of requests
      that returned an error. Requests are attributed to the millisecond
      they ARRIVED at the SAN.

  cache_report.py stats FILE
      Print the read/write op and byte counts of an nbdkit stats-filter file
      as JSON.

  cache_report.py scrape URL OUT
      Save flashtierd's /metrics text (its own cache counters) to OUT.

  cache_report.py summarize --runs DIR --rounds N --clk-tck N --md OUT.md
                            --json OUT.json [--meta KEY=VALUE ...]
      Read every SYSTEM.WORKLOAD.rN.* file (fio JSON, CPU samples, the SAN
      bins of the server start it ran in, flashtierd's metrics before and
      after), print the Markdown report and write OUT.md and OUT.json.

Hit ratio, measured outside the system under test: in fio's measured window
[timestamp_ms - runtime, timestamp_ms], 1 - (bytes the SAN was asked to read)
/ (bytes fio read). The SAN's stats filter (lifetime totals, written when it
exits) cross-checks the log: both must count the same read and write ops.
"""
import argparse
import calendar
import json
import os
import re
import sys
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report  # noqa: E402
from report import (add_output_args, iops_per_round, load_fio, load_samples,  # noqa: E402
                    median, meets, parse_meta, ratio, ratio_stats, ticks_at, write_report)

SYSTEMS = ("flashtierd", "nbdkit-cache", "san-direct", "nbdkit-memory")
LABELS = {
    "flashtierd": "flashtierd",
    "nbdkit-cache": "nbdkit cache filter",
    "san-direct": "SAN direct",
    "nbdkit-memory": "nbdkit memory",
}
# name -> (group, rw, description)
WORKLOADS = {
    "warm-randread-qd1": ("warm", "randread", "4K randread QD1, warm (working set fits)"),
    "warm-randread-qd32": ("warm", "randread", "4K randread QD32, warm (working set fits)"),
    "cold-randread-qd32": ("cold", "randread", "4K randread QD32, cold (every read a miss)"),
    "zipf-randrw-qd32": ("zipf", "randrw", "4K zipf:1.1 70/30 randrw QD32"),
}
# (workload, metric, candidate, anchor, op, threshold, label)
TARGETS = (
    ("warm-randread-qd1", "iops", "flashtierd", "nbdkit-cache", ">=", 1.0, "IOPS vs nbdkit cache filter"),
    ("warm-randread-qd32", "iops", "flashtierd", "nbdkit-cache", ">=", 1.0, "IOPS vs nbdkit cache filter"),
    ("warm-randread-qd1", "clat_p50_us", "flashtierd", "nbdkit-memory", "<=", 1.2, "p50 vs nbdkit memory"),
    ("cold-randread-qd32", "iops", "flashtierd", "san-direct", ">=", 0.9, "IOPS vs SAN direct"),
    ("zipf-randrw-qd32", "iops", "flashtierd", "nbdkit-cache", ">=", 5.0, "IOPS vs nbdkit cache filter"),
    ("zipf-randrw-qd32", "iops", "flashtierd", "san-direct", ">=", 2.0, "IOPS vs SAN direct"),
)

# ---------------------------------------------------------------- sanlog

LOG_RE = re.compile(
    r"^(\d{4})-(\d\d)-(\d\d) (\d\d):(\d\d):(\d\d)\.(\d+) connection=\d+ "
    r"(\.\.\.)?(Read|Write|Zero|Trim|Flush|Cache|Extents|BlockStatus)\b(.*)$")
COUNT_RE = re.compile(r"count=0x([0-9a-fA-F]+)")
RET_RE = re.compile(r"return=(-?\d+)")


def cmd_sanlog(args):
    bins = {}  # ms -> [rops, rbytes, wops, wbytes, other]
    tot = {"read_ops": 0, "read_bytes": 0, "write_ops": 0, "write_bytes": 0,
           "other_ops": 0, "errors": 0}
    sec_cache = {}
    with open(args.log, errors="replace") as f:
        for line in f:
            m = LOG_RE.match(line)
            if not m:
                continue
            y, mo, d, h, mi, s, frac, done, op, rest = m.groups()
            if done:  # the completion line: only look for errors
                r = RET_RE.search(rest)
                if r and int(r.group(1)) != 0:
                    tot["errors"] += 1
                continue
            key = (y, mo, d, h, mi, s)
            sec = sec_cache.get(key)
            if sec is None:
                sec = calendar.timegm((int(y), int(mo), int(d), int(h), int(mi), int(s)))
                sec_cache[key] = sec
            ms = sec * 1000 + int((frac + "000000")[:6]) // 1000
            b = bins.setdefault(ms, [0, 0, 0, 0, 0])
            c = COUNT_RE.search(rest)
            n = int(c.group(1), 16) if c else 0
            if op == "Read":
                b[0] += 1
                b[1] += n
                tot["read_ops"] += 1
                tot["read_bytes"] += n
            elif op in ("Write", "Zero"):
                b[2] += 1
                b[3] += n
                tot["write_ops"] += 1
                tot["write_bytes"] += n
            else:
                b[4] += 1
                tot["other_ops"] += 1
    with open(args.out, "w") as out:
        out.write("# total " + json.dumps(tot) + "\n")
        for ms in sorted(bins):
            out.write(f"{ms} {' '.join(str(v) for v in bins[ms])}\n")
    return 0


def load_bins(path):
    total = None
    bins = []
    with open(path) as f:
        for line in f:
            if line.startswith("# total "):
                total = json.loads(line[len("# total "):])
                continue
            p = line.split()
            if len(p) == 6:
                bins.append([int(v) for v in p])
    return total, bins


def window_sum(bins, start_ms, end_ms):
    r = {"read_ops": 0, "read_bytes": 0, "write_ops": 0, "write_bytes": 0}
    for ms, rops, rbytes, wops, wbytes, _ in bins:
        if start_ms <= ms < end_ms:
            r["read_ops"] += rops
            r["read_bytes"] += rbytes
            r["write_ops"] += wops
            r["write_bytes"] += wbytes
    return r

# ---------------------------------------------------------------- stats filter

UNITS = {"bytes": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40, "PiB": 2**50}
STATS_RE = re.compile(r"^(read|write|zero|trim|flush|cache|extents|total): (\d+) ops, [0-9.]+ s"
                      r"(?:, ([0-9.]+) (bytes|KiB|MiB|GiB|TiB|PiB))?")


def parse_stats(path):
    res = {}
    with open(path) as f:
        for line in f:
            m = STATS_RE.match(line)
            if not m:
                continue
            op, ops, num, unit = m.groups()
            res[op + "_ops"] = res.get(op + "_ops", 0) + int(ops)
            if num is not None:
                res[op + "_bytes"] = res.get(op + "_bytes", 0) + float(num) * UNITS[unit]
    return res


def cmd_stats(args):
    print(json.dumps(parse_stats(args.file)))
    return 0

# ---------------------------------------------------------------- flashtierd metrics


def cmd_scrape(args):
    with urllib.request.urlopen(args.url, timeout=5) as r:
        text = r.read().decode()
    with open(args.out, "w") as f:
        f.write(text)
    return 0


def load_metrics(path):
    vals = {}
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("#") or not line.strip():
                    continue
                name, _, v = line.rpartition(" ")
                name = name.split("{", 1)[0]
                if name.startswith("flashtier_cache_"):
                    try:
                        vals[name] = vals.get(name, 0.0) + float(v)
                    except ValueError:
                        pass
    except OSError:
        return None
    return vals

# ---------------------------------------------------------------- ideal hit ratio


def load_iolog(path):
    """fio --write_iolog output -> [(is_read, block)]."""
    out = []
    with open(path) as f:
        for line in f:
            p = line.split()
            if len(p) == 5 and p[2] in ("read", "write"):
                out.append((p[2] == "read", int(p[3]) // 4096))
            elif len(p) == 4 and p[1] in ("read", "write"):  # iolog v2 (no timestamps)
                out.append((p[1] == "read", int(p[2]) // 4096))
    return out


def ideal_hit_ratio(warm, meas, n_warm, n_meas, capacity):
    """Read hit ratio over meas[:n_meas] of an LRU write-through cache of
    @capacity blocks that saw warm[:n_warm] first: a write leaves the block
    cached (the data just went through), a read miss fills it."""
    from collections import OrderedDict
    c = OrderedDict()

    def touch(b):
        if b in c:
            c.move_to_end(b)
            return True
        c[b] = None
        if len(c) > capacity:
            c.popitem(last=False)
        return False
    for _, b in warm[:n_warm]:
        touch(b)
    hits = reads = 0
    for is_read, b in meas[:n_meas]:
        h = touch(b)
        if is_read:
            reads += 1
            hits += h
    return hits / reads if reads else None


# ---------------------------------------------------------------- summary


NONE = "–"  # how a missing number is written


def fmt_int(v):
    return report.fmt_int(v, NONE)


def fmt_f(v, nd=0):
    return report.fmt_f(v, nd, NONE)


def fmt_hr(v):
    return NONE if v is None else f"{v:.3f}"


def fmt_ratio(v):
    return NONE if v is None else (f"{v:.2f}×" if v < 10 else f"{v:.1f}×")


def fmt_range(st):
    return report.fmt_ratio_range(st, fmt_ratio, NONE)


def pct(sect, p):
    v = sect["clat_ns"].get("percentile", {}).get(p)
    return None if v is None else v / 1000.0


def summarize_run(prefix, group_prefix, rw, clk_tck):
    fio = load_fio(prefix + ".fio.json")
    job = fio["jobs"][0]
    if job.get("error"):
        raise SystemExit(f"cache_report.py: {prefix}: fio reported error {job['error']}")
    rd, wr = job["read"], job["write"]
    runtime_ms = max(rd["runtime"], wr["runtime"])
    end_ms = float(fio["timestamp_ms"])
    start_ms = end_ms - runtime_ms
    total_ios = rd["total_ios"] + wr["total_ios"]
    res = {
        "iops": rd["iops"] + wr["iops"],
        "read_iops": rd["iops"],
        "write_iops": wr["iops"],
        "total_ios": total_ios,
        "runtime_ms": runtime_ms,
        "client_read_bytes": rd["io_bytes"],
        "client_write_bytes": wr["io_bytes"],
        # randrw: the read latencies (the cache's business); writes go to the SAN
        "clat_p50_us": pct(rd, "50.000000"),
        "clat_p99_us": pct(rd, "99.000000"),
        "clat_p99_9_us": pct(rd, "99.900000"),
        "write_clat_p50_us": pct(wr, "50.000000") if wr["total_ios"] else None,
        "write_clat_p99_us": pct(wr, "99.000000") if wr["total_ios"] else None,
        "client_cpu_pct": job.get("usr_cpu", 0) + job.get("sys_cpu", 0),
        "fio_timestamp_ms": fio["timestamp_ms"],
    }
    # server CPU over the measured window
    if os.path.exists(prefix + ".cpu"):
        samples = load_samples(prefix + ".cpu")
        ticks = ticks_at(samples, end_ms) - ticks_at(samples, start_ms)
        res["cpu_us_per_io"] = ticks / clk_tck * 1e6 / total_ios if total_ios else None
        res["server_cpu_pct"] = 100.0 * ticks / clk_tck / (runtime_ms / 1000.0) if runtime_ms else None
    else:
        res["cpu_us_per_io"] = res["server_cpu_pct"] = None
    # what the SAN saw in the same window
    bins_path = group_prefix + ".san-bins" if group_prefix else None
    if bins_path and os.path.exists(bins_path):
        _, bins = load_bins(bins_path)
        # Exact when fio had no ramp_time: every byte fio moved is in io_bytes and
        # every SAN request between fio's start and exit was made on its behalf.
        # With a ramp, fall back to fio's measured window (edges approximate).
        ramp = float(job.get("job options", {}).get("ramp_time", "0").rstrip("s") or 0)
        win = None
        if ramp == 0 and os.path.exists(prefix + ".window"):
            with open(prefix + ".window") as f:
                t0, t1 = (int(x) for x in f.read().split())
            win = (t0, t1 + 1)
            res["hit_ratio_window"] = "fio process"
        else:
            win = (start_ms, end_ms)
            res["hit_ratio_window"] = "fio measured window (approximate edges)"
        w = window_sum(bins, *win)
        res["san_read_ops"] = w["read_ops"]
        res["san_read_bytes"] = w["read_bytes"]
        res["san_write_ops"] = w["write_ops"]
        res["san_write_bytes"] = w["write_bytes"]
        res["hit_ratio"] = (1.0 - w["read_bytes"] / rd["io_bytes"]) if rd["io_bytes"] else None
        res["san_write_ratio"] = (w["write_bytes"] / wr["io_bytes"]) if wr["io_bytes"] else None
    else:
        res["hit_ratio"] = res["san_write_ratio"] = None
    # flashtierd's own view of the same run (metrics scraped before and after fio)
    before, after = load_metrics(prefix + ".metrics-before"), load_metrics(prefix + ".metrics-after")
    if before is not None and after is not None:
        d = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        hb, mb = d.get("flashtier_cache_hit_bytes_total", 0), d.get("flashtier_cache_miss_bytes_total", 0)
        res["own_hit_ratio_whole_job"] = hb / (hb + mb) if hb + mb else None
        res["own_counters_whole_job"] = {k[len("flashtier_cache_"):]: v for k, v in d.items()
                                         if k.endswith("_total")}
    return res


MEDIAN_KEYS = ("iops", "read_iops", "write_iops", "total_ios", "runtime_ms", "clat_p50_us",
               "clat_p99_us", "clat_p99_9_us", "write_clat_p50_us", "write_clat_p99_us",
               "client_cpu_pct", "cpu_us_per_io", "server_cpu_pct", "hit_ratio",
               "san_write_ratio", "own_hit_ratio_whole_job")


def lifetime_checks(runs_dir, nrounds):
    """Log filter vs stats filter over each SAN lifetime: must agree."""
    out = []
    for name in sorted(os.listdir(runs_dir)):
        if not name.endswith(".san-bins"):
            continue
        base = name[:-len(".san-bins")]
        total, _ = load_bins(os.path.join(runs_dir, name))
        sp = os.path.join(runs_dir, base + ".san-stats")
        stats = parse_stats(sp) if os.path.exists(sp) else {}
        ok = (total is not None and stats.get("read_ops", 0) == total["read_ops"]
              and stats.get("write_ops", 0) + stats.get("zero_ops", 0) == total["write_ops"])
        out.append({"lifetime": base, "log": total, "stats": stats, "agree": ok,
                    "errors": total["errors"] if total else None})
    return out


def cmd_summarize(args):
    meta = parse_meta(args.meta)
    nrounds = args.rounds
    systems = [s for s in args.systems.split(",") if s]
    workloads = [w for w in args.workloads.split(",") if w]

    per_round, results = {}, {}
    for w in workloads:
        group, rw, _ = WORKLOADS[w]
        per_round[w], results[w] = {}, {}
        for s in systems:
            runs = []
            for rnd in range(1, nrounds + 1):
                prefix = os.path.join(args.runs, f"{s}.{w}.r{rnd}")
                if not os.path.exists(prefix + ".fio.json"):
                    break
                gp = os.path.join(args.runs, f"{s}.{group}.r{rnd}")
                r = summarize_run(prefix, gp, rw, args.clk_tck)
                r["round"] = rnd
                runs.append(r)
            if not runs:
                continue
            per_round[w][s] = runs
            results[w][s] = {k: median(r.get(k) for r in runs) for k in MEDIAN_KEYS}

    # zipf: the hit ratio an LRU write-through cache of the same size would get
    # on the very same I/O sequence, with the same numbers of warm-up and
    # measured I/Os as each system did
    if args.zipf_trace_warmup and args.zipf_trace and "zipf-randrw-qd32" in per_round:
        tw, tm = load_iolog(args.zipf_trace_warmup), load_iolog(args.zipf_trace)
        memo = {}
        for s, runs in per_round["zipf-randrw-qd32"].items():
            for r in runs:
                wp = os.path.join(args.runs, f"{s}.zipf-warmup.r{r['round']}.fio.json")
                if not os.path.exists(wp):
                    continue
                wj = load_fio(wp)["jobs"][0]
                nw = wj["read"]["total_ios"] + wj["write"]["total_ios"]
                nm = r["total_ios"]
                if nw > len(tw) or nm > len(tm):
                    continue
                key = (nw, nm)
                if key not in memo:
                    memo[key] = ideal_hit_ratio(tw, tm, nw, nm, args.cache_blocks)
                r["ideal_hit_ratio"] = memo[key]
                r["warmup_ios"] = nw
            results["zipf-randrw-qd32"][s]["ideal_hit_ratio"] = median(r.get("ideal_hit_ratio") for r in runs)
            results["zipf-randrw-qd32"][s]["warmup_ios"] = median(r.get("warmup_ios") for r in runs)

    # warm-up passes: their hit ratios (the second pass should be all hits)
    warmups = {}
    for name in sorted(os.listdir(args.runs)):
        m = re.match(r"^([a-z-]+)\.(warm|zipf)-warmup(\d*)\.r(\d+)\.fio\.json$", name)
        if not m:
            continue
        s, group, k, rnd = m.groups()
        prefix = os.path.join(args.runs, name[:-len(".fio.json")])
        r = summarize_run(prefix, os.path.join(args.runs, f"{s}.{group}.r{rnd}"),
                          "randrw" if group == "zipf" else "randread", args.clk_tck)
        warmups.setdefault(s, {}).setdefault(f"{group}-warmup{k}", []).append(
            {"round": int(rnd), "hit_ratio": r["hit_ratio"], "iops": r["iops"],
             "total_ios": r["total_ios"], "client_read_bytes": r["client_read_bytes"],
             "san_read_bytes": r.get("san_read_bytes")})

    ratios, checks = {}, []
    for (w, key, cand, anchor, op, thr, label) in TARGETS:
        if w not in per_round or cand not in per_round[w] or anchor not in per_round[w]:
            continue
        st = ratio_stats(per_round[w][cand], per_round[w][anchor], key)
        ratios.setdefault(w, {})[f"{key}:{cand}/{anchor}"] = st
        r = st["median"]
        verdict = "n/a" if r is None else ("yes" if meets(r, op, thr) else "no")
        checks.append({"workload": w, "check": label, "key": key, "candidate": cand,
                       "anchor": anchor, "op": op, "target": thr, "ratio": st,
                       "rounds_meeting_target": sum(1 for v in st["rounds"] if v is not None and meets(v, op, thr)),
                       "met": verdict})

    lifetimes = lifetime_checks(args.runs, nrounds)

    L = []
    p = L.append
    p(f"# flashtierd read cache vs nbdkit cache filter vs SAN direct ({meta.get('date', '')}, "
      f"{nrounds} round{'s' if nrounds != 1 else ''})")
    p("")
    for key, label in (("flashtierd", "flashtierd"), ("nbdkit", "nbdkit"), ("fio", "fio"),
                       ("kernel", "kernel"), ("cpu_model", "CPU"), ("san", "SAN"),
                       ("systems", "systems"), ("cache", "cache"), ("workloads", "workloads"),
                       ("rounds_desc", "rounds"), ("loadavg_start", "load average at start"),
                       ("loadavg_end", "load average at end")):
        if meta.get(key):
            p(f"- {label}: {meta[key]}")
    p("")
    p("Every number is the median over the rounds (each metric separately). Latencies are fio "
      "completion latencies (for randrw: of the reads). **Hit ratio** is measured outside the "
      "system: 1 − (bytes the SAN was asked to read while fio ran, from the SAN's nbdkit log "
      "filter's timestamps) / (bytes fio read); the stats filter's lifetime totals cross-check "
      "the log. CPU µs/IO is the server process "
      "(for SAN direct: the SAN itself) over the measured window, SAN excluded. Ratios vs anchors "
      "are computed per round and shown as the median of the per-round ratios "
      "(min–max over rounds).")
    p("")
    p("| workload | system | IOPS | p50 µs | p99 µs | hit ratio | CPU µs/IO | vs anchors |")
    p("|---|---|---:|---:|---:|---:|---:|---|")
    anchors_for = {
        "warm-randread-qd1": (("iops", "nbdkit-cache", "IOPS/cache filter"), ("clat_p50_us", "nbdkit-memory", "p50/memory")),
        "warm-randread-qd32": (("iops", "nbdkit-cache", "IOPS/cache filter"), ("clat_p50_us", "nbdkit-memory", "p50/memory")),
        "cold-randread-qd32": (("iops", "san-direct", "IOPS/SAN"),),
        "zipf-randrw-qd32": (("iops", "nbdkit-cache", "IOPS/cache filter"), ("iops", "san-direct", "IOPS/SAN")),
    }
    for w in workloads:
        for s in systems:
            if s not in results.get(w, {}):
                continue
            m = results[w][s]
            cells = []
            for key, anchor, lab in anchors_for.get(w, ()):
                if anchor == s or anchor not in per_round[w]:
                    continue
                st = ratio_stats(per_round[w][s], per_round[w][anchor], key)
                ratios.setdefault(w, {})[f"{key}:{s}/{anchor}"] = st
                cells.append(f"{lab} {fmt_range(st)}")
            hr = fmt_hr(m["hit_ratio"]) if s != "nbdkit-memory" else "n/a"
            p(f"| {w} | {LABELS[s]} | {fmt_int(m['iops'])} | {fmt_f(m['clat_p50_us'])} | "
              f"{fmt_f(m['clat_p99_us'])} | {hr} | {fmt_f(m['cpu_us_per_io'], 1)} | "
              f"{'; '.join(cells) if cells else ''} |")
    p("")
    p("## Targets")
    p("")
    p("| workload | target | flashtierd / anchor (min–max) | rounds meeting it | met |")
    p("|---|---|---:|---:|---|")
    for c in checks:
        p(f"| {c['workload']} | {c['check']} {c['op']} {c['target']:g}× | {fmt_range(c['ratio'])} | "
          f"{c['rounds_meeting_target']} of {c['ratio']['n']} | **{c['met']}** |")
    p("")
    met = [c["met"] for c in checks]
    p(f"**{met.count('yes')} of {len(met)} targets met.**")
    p("")

    # extra facts
    p("## Details")
    p("")
    if "zipf-randrw-qd32" in results:
        p("zipf randrw: read / write IOPS, write p50, SAN write bytes / client write bytes:")
        p("")
        for s, m in results["zipf-randrw-qd32"].items():
            p(f"- {LABELS[s]}: {fmt_int(m['read_iops'])} / {fmt_int(m['write_iops'])} IOPS, "
              f"write p50 {fmt_f(m['write_clat_p50_us'])} µs, SAN writes {fmt_ratio(m['san_write_ratio'])} "
              f"of client writes"
              + ("" if s == "san-direct" else
                 f"; hit ratio {fmt_hr(m['hit_ratio'])}, ideal {fmt_hr(m.get('ideal_hit_ratio'))} "
                 f"(after {fmt_int(m.get('warmup_ios'))} warm-up I/Os)"))
        p("")
        p("\"ideal\": the read hit ratio of an LRU write-through cache of the same size "
          "(writes leave their block cached, read misses fill) replaying the same fio I/O "
          "sequence (regenerated with fio's null engine) with the same numbers of warm-up "
          "and measured I/Os as that system did; in-flight overlap ignored.")
        p("")
    own = [(w, results[w]["flashtierd"]) for w in workloads
           if "flashtierd" in results.get(w, {}) and results[w]["flashtierd"].get("own_hit_ratio_whole_job") is not None]
    if own:
        p("flashtierd's own metrics (hit bytes / (hit + miss bytes), over the whole fio job) "
          "vs the hit ratio measured at the SAN: " + "; ".join(
              f"{w}: {fmt_hr(m['own_hit_ratio_whole_job'])} vs {fmt_hr(m['hit_ratio'])}" for w, m in own))
        p("")
    if warmups:
        p("Warm-up hit ratios at the SAN (median over rounds): " + "; ".join(
            f"{LABELS.get(s, s)} " + ", ".join(
                f"{k} {fmt_hr(median(x['hit_ratio'] for x in v))}" for k, v in sorted(d.items()))
            for s, d in warmups.items()))
        p("")
    bad = [x for x in lifetimes if not x["agree"]]
    errs = sum(x["errors"] or 0 for x in lifetimes)
    p(f"SAN accounting: {len(lifetimes)} SAN lifetimes; the log filter and the stats filter "
      + ("agree on the read and write op counts of every one"
         if not bad else f"DISAGREE on {len(bad)}: " + ", ".join(x['lifetime'] for x in bad))
      + f"; {errs} SAN request(s) returned an error.")
    if nrounds > 1:
        iops_per_round(p, nrounds, "system")
        for w in workloads:
            for s in systems:
                if s in per_round.get(w, {}):
                    p(f"| {w} | {LABELS[s]} | " + " | ".join(fmt_int(r["iops"]) for r in per_round[w][s]) + " |")
    out = {"meta": meta, "rounds": nrounds, "systems": systems, "workloads": workloads,
           "results": results, "results_per_round": per_round, "ratios": ratios,
           "checks": checks, "warmups": warmups, "san_lifetimes": lifetimes}
    write_report(args, L, meta, out, "PASS" if met and all(v == "yes" for v in met) else "FAIL")
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sanlog")
    s.add_argument("log")
    s.add_argument("out")
    s.set_defaults(func=cmd_sanlog)
    s = sub.add_parser("stats")
    s.add_argument("file")
    s.set_defaults(func=cmd_stats)
    s = sub.add_parser("scrape")
    s.add_argument("url")
    s.add_argument("out")
    s.set_defaults(func=cmd_scrape)
    r = sub.add_parser("summarize")
    r.add_argument("--runs", required=True)
    r.add_argument("--rounds", type=int, default=1)
    r.add_argument("--systems", default=",".join(SYSTEMS))
    r.add_argument("--workloads", default=",".join(WORKLOADS))
    add_output_args(r)
    r.add_argument("--zipf-trace-warmup", help="fio iolog of the zipf warm-up job")
    r.add_argument("--zipf-trace", help="fio iolog of the measured zipf job")
    r.add_argument("--cache-blocks", type=int, default=65536)
    r.set_defaults(func=cmd_summarize)
    args = ap.parse_args()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
