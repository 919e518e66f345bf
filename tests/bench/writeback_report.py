#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Helper for tests/bench/write-back.sh (standard library only).

  writeback_report.py scrape URL OUT
      Save flashtierd's /metrics text to OUT.

  writeback_report.py summarize --runs DIR --rounds N --clk-tck N --md OUT.md
                                --json OUT.json [--meta KEY=VALUE ...]
      Read every SYSTEM.WORKLOAD.rN.* file (fio JSON, flashtierd's metrics
      before and after, the SAN's stats-filter file), print the Markdown
      report and write OUT.md and OUT.json.

Latency is fio's total latency (lat: submission + completion; for the psync
engine the whole pwrite), p50 over the measured window. Ratios are computed
per round (both sides ran in the same round, close in time) and reported as
the median of the per-round ratios with their min-max range; the targets are
checked against that median.
"""
import argparse
import json
import os
import sys
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report  # noqa: E402
from report import add_output_args, load_fio, median, meets, parse_meta, ratio_stats, write_report  # noqa: E402
from cache_report import parse_stats  # noqa: E402

LABELS = {
    "device-direct": "cache device, fio O_DIRECT",
    "flashtierd": "flashtierd write-back",
    "nbdkit-cache": "nbdkit cache filter (writeback)",
    "nbdkit-memory": "nbdkit memory (the NBD round trip, no I/O)",
    "flashtierd-small": "flashtierd, small dirty_limit",
    "nbdkit-cache-small": "nbdkit cache filter, small cache-max-size",
}
PERF_WORKLOADS = ("randwrite-qd1", "randwrite-qd32")
# (workload, metric, candidate, anchor, op, threshold, label)
TARGETS = (
    ("randwrite-qd1", "lat_p50_us", "flashtierd", "device-direct", "<=", 1.3,
     "(a) 4K randwrite QD1 p50 latency vs the cache device's own O_DIRECT write"),
    ("randwrite-qd32", "iops", "flashtierd", "nbdkit-cache", ">=", 1.0,
     "(b) 4K randwrite QD32 IOPS vs nbdkit cache filter (cache=writeback)"),
)
NONE = "–"
# flashtierd counters whose change over a run is reported
COUNTERS = ("flashtier_cache_throttled_writes_total", "flashtier_cache_destaged_bytes_total",
            "flashtier_cache_destage_errors_total")
GAUGES = ("flashtier_cache_dirty_bytes", "flashtier_cache_log_limit_bytes",
          "flashtier_cache_log_used_bytes", "flashtier_cache_log_size_bytes")


def cmd_scrape(args):
    with urllib.request.urlopen(args.url, timeout=5) as r:
        text = r.read().decode()
    with open(args.out, "w") as f:
        f.write(text)
    return 0


def load_metrics(path):
    """flashtier_cache_* values of a saved /metrics text (summed over labels)."""
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


def pct(sect, kind, p):
    v = sect.get(kind, {}).get("percentile", {}).get(p)
    return None if v is None else v / 1000.0


def fmt_int(v):
    return report.fmt_int(v, NONE)


def fmt_f(v, nd=1):
    return report.fmt_f(v, nd, NONE)


def fmt_ratio(v):
    return NONE if v is None else (f"{v:.2f}×" if v < 10 else f"{v:.1f}×")


def fmt_range(st):
    return report.fmt_ratio_range(st, fmt_ratio, NONE)


def fmt_bytes(v):
    if v is None:
        return NONE
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(v) >= div:
            return f"{v / div:.1f} {unit}"
    return f"{v:.0f} B"


def metrics_delta(prefix):
    before, after = load_metrics(prefix + ".metrics-before"), load_metrics(prefix + ".metrics-after")
    if before is None or after is None:
        return None
    d = {k: after.get(k, 0) - before.get(k, 0) for k in COUNTERS if k in after}
    for k in GAUGES:
        if k in after:
            d[k] = after[k]
    return d


def san_stats(prefix):
    p = prefix + ".san-stats"
    return parse_stats(p) if os.path.exists(p) else None


def read_hang(prefix):
    p = prefix + ".hang"
    if not os.path.exists(p):
        return None
    with open(p) as f:
        return f.read().strip()


def summarize_perf(prefix):
    hang = read_hang(prefix)
    if hang is not None:
        return {"hung": True, "hang": hang}
    fio = load_fio(prefix + ".fio.json")
    job = fio["jobs"][0]
    if job.get("error"):
        raise SystemExit(f"writeback_report.py: {prefix}: fio error {job['error']}")
    w = job["write"]
    res = {
        "iops": w["iops"],
        "total_ios": w["total_ios"],
        "runtime_ms": w["runtime"],
        "bw_MiBps": w["bw_bytes"] / 2**20,
        "lat_p50_us": pct(w, "lat_ns", "50.000000"),
        "lat_p99_us": pct(w, "lat_ns", "99.000000"),
        "lat_p99_9_us": pct(w, "lat_ns", "99.900000"),
        "clat_p50_us": pct(w, "clat_ns", "50.000000"),
        "lat_mean_us": w["lat_ns"]["mean"] / 1000.0,
        "client_cpu_pct": job.get("usr_cpu", 0) + job.get("sys_cpu", 0),
    }
    d = metrics_delta(prefix)
    if d is not None:
        res["metrics"] = d
        res["throttled_writes"] = d.get("flashtier_cache_throttled_writes_total")
        res["destaged_bytes"] = d.get("flashtier_cache_destaged_bytes_total")
        res["dirty_bytes_after"] = d.get("flashtier_cache_dirty_bytes")
    s = san_stats(prefix)
    if s is not None:
        res["san_write_bytes"] = s.get("write_bytes", 0) + s.get("zero_bytes", 0)
        res["san_write_ops"] = s.get("write_ops", 0) + s.get("zero_ops", 0)
    return res


def summarize_verify(prefix):
    """A write-then-verify run (and the later verify-only pass against the
    SAN): blocks written, verify errors."""
    out = {}
    hang = read_hang(prefix)
    if hang is not None:
        out.update({"hung": True, "hang": hang, "written_blocks": None, "verify_errors": None})
    else:
        fio = load_fio(prefix + ".fio.json")
        job = fio["jobs"][0]
        out["written_blocks"] = job["write"]["io_bytes"] // 4096
        out["verified_bytes"] = job["read"]["io_bytes"]
        out["verify_errors"] = job.get("total_err", 0)
        out["fio_error"] = job.get("error", 0)
        out["first_error"] = first_verify_line(prefix + ".fio.log")
    san = prefix + "-san"
    if os.path.exists(san + ".fio.json"):
        sj = load_fio(san + ".fio.json")["jobs"][0]
        out["san_verified_bytes"] = sj["read"]["io_bytes"]
        out["san_verify_errors"] = sj.get("total_err", 0)
        out["san_first_error"] = first_verify_line(san + ".fio.log")
    d = metrics_delta(prefix)
    if d is not None:
        out["metrics"] = d
        out["throttled_writes"] = d.get("flashtier_cache_throttled_writes_total")
        out["destaged_bytes"] = d.get("flashtier_cache_destaged_bytes_total")
    note = prefix + ".note"
    if os.path.exists(note):
        out["note"] = open(note).read().strip()
    return out


def first_verify_line(path):
    try:
        with open(path, errors="replace") as f:
            for line in f:
                if line.startswith("verify:") or "verify" in line.lower() and "fio:" in line:
                    return line.strip()
    except OSError:
        pass
    return None


def verdict_of(v):
    """'ok' or a description of what was lost."""
    bad = []
    if v.get("hung"):
        bad.append("HUNG: the server stopped completing writes")
    if v.get("fio_error") and not v.get("verify_errors"):
        bad.append(f"fio error {v['fio_error']}")
    if v.get("verify_errors"):
        bad.append(f"{v['verify_errors']} of {v['written_blocks']} blocks read back wrong")
    if v.get("san_verify_errors"):
        bad.append(f"{v['san_verify_errors']} wrong on the SAN after flush/drain")
    if v.get("hung") and len(bad) == 1:
        return bad[0]
    return "ok" if not bad else "LOST/CORRUPT: " + "; ".join(bad)


def cmd_summarize(args):
    meta = parse_meta(args.meta)
    nrounds = args.rounds
    systems = [s for s in args.systems.split(",") if s]
    workloads = [w for w in args.workloads.split(",") if w]

    per_round, results = {}, {}
    for w in [w for w in workloads if w in PERF_WORKLOADS]:
        per_round[w], results[w] = {}, {}
        for s in systems:
            runs = []  # one per round, {"round": N} alone when it did not run
            for rnd in range(1, nrounds + 1):
                prefix = os.path.join(args.runs, f"{s}.{w}.r{rnd}")
                if os.path.exists(prefix + ".hang") or os.path.exists(prefix + ".fio.json"):
                    r = summarize_perf(prefix)
                else:
                    r = {}
                r["round"] = rnd
                runs.append(r)
            done = [r for r in runs if "iops" in r]
            hung = [r for r in runs if r.get("hung")]
            if not done and not hung:
                continue
            per_round[w][s] = runs
            keys = sorted({k for r in done for k in r if isinstance(r[k], (int, float)) and k != "round"})
            results[w][s] = {k: median(r.get(k) for r in done) for k in keys}
            results[w][s]["rounds_hung"] = len(hung)
            results[w][s]["rounds_done"] = len(done)

    verify = {}
    if "verify" in workloads:
        for s in systems:
            rows = []
            for rnd in range(1, nrounds + 1):
                prefix = os.path.join(args.runs, f"{s}.verify.r{rnd}")
                if os.path.exists(prefix + ".fio.json"):
                    v = summarize_verify(prefix)
                    v["round"] = rnd
                    v["verdict"] = verdict_of(v)
                    rows.append(v)
            if rows:
                verify[s] = rows

    ratios, checks = {}, []
    for (w, key, cand, anchor, op, thr, label) in TARGETS:
        if w not in per_round or cand not in per_round[w] or anchor not in per_round[w]:
            continue
        st = ratio_stats(per_round[w][cand], per_round[w][anchor], key)
        ratios.setdefault(w, {})[f"{key}:{cand}/{anchor}"] = st
        r = st["median"]
        met = "n/a" if r is None else ("yes" if meets(r, op, thr) else "no")
        nhung = results[w][cand].get("rounds_hung", 0)
        if nhung:
            met = f"no ({cand} hung in {nhung} of {nrounds} rounds)"
        checks.append({"workload": w, "check": label, "key": key, "candidate": cand, "anchor": anchor,
                       "op": op, "target": thr, "ratio": st, "met": met,
                       "rounds_meeting_target": sum(1 for v in st["rounds"]
                                                    if v is not None and meets(v, op, thr)),
                       "rounds": nrounds})
    if "flashtierd-small" in verify:
        rows = verify["flashtierd-small"]
        lost = [r for r in rows if r["verdict"] != "ok"]
        checks.append({"workload": "verify", "check": "(c) flashtierd loses or corrupts no data "
                       "(small dirty_limit: destage and throttling)", "key": "verify_errors",
                       "candidate": "flashtierd-small", "anchor": None, "op": "==", "target": 0,
                       "ratio": None, "met": "yes" if not lost else "no",
                       "rounds_meeting_target": len(rows) - len(lost), "rounds": len(rows)})

    L = []
    p = L.append
    p(f"# flashtierd write-back vs nbdkit cache filter ({meta.get('date', '')}, "
      f"{nrounds} round{'s' if nrounds != 1 else ''})")
    p("")
    for key, label in (("flashtierd", "flashtierd"), ("nbdkit", "nbdkit"), ("fio", "fio"),
                       ("kernel", "kernel"), ("cpu_model", "CPU"), ("san", "SAN"),
                       ("cache", "cache device"), ("workloads", "workloads"),
                       ("rounds_desc", "rounds"), ("loadavg_start", "load average at start"),
                       ("loadavg_end", "load average at end"), ("elapsed_s", "elapsed (s)")):
        if meta.get(key):
            p(f"- {label}: {meta[key]}")
    p("")
    p("Every number is the median over the rounds (each metric separately). Latency is fio's "
      "total latency (submission + completion). Ratios are computed per round and shown as the "
      "median of the per-round ratios (min–max over rounds). SAN writes: bytes the SAN's stats "
      "filter saw written during that system's lifetime (one per run).")
    p("")
    p("## Performance")
    p("")
    p("| workload | system | IOPS | p50 µs | p99 µs | p99.9 µs | SAN writes | "
      "flashtierd: throttled writes | destaged | dirty after | hung |")
    p("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for w in per_round:
        for s in systems:
            if s not in results[w]:
                continue
            m = results[w][s]
            p(f"| {w} | {LABELS.get(s, s)} | {fmt_int(m.get('iops'))} | {fmt_f(m.get('lat_p50_us'))} | "
              f"{fmt_f(m.get('lat_p99_us'))} | {fmt_f(m.get('lat_p99_9_us'))} | "
              f"{fmt_bytes(m.get('san_write_bytes')) if s != 'device-direct' else NONE} | "
              f"{fmt_int(m.get('throttled_writes'))} | {fmt_bytes(m.get('destaged_bytes'))} | "
              f"{fmt_bytes(m.get('dirty_bytes_after'))} | "
              f"{'**HUNG in ' + str(m['rounds_hung']) + ' of ' + str(nrounds) + '**' if m.get('rounds_hung') else 'no'} |")
    p("")
    hangs = [(w, s, r) for w in per_round for s in per_round[w] for r in per_round[w][s] if r.get("hung")]
    if hangs:
        p("Runs that hung (fio killed; the server had stopped completing requests), "
          "with flashtierd's metrics at that moment:")
        p("")
        for w, s, r in hangs:
            p(f"- {w}, {LABELS.get(s, s)}, round {r['round']}: `" + " · ".join(r["hang"].splitlines()) + "`")
        p("")
    p("## Targets")
    p("")
    p("| target | flashtierd / anchor (min–max) | rounds meeting it | met |")
    p("|---|---:|---:|---|")
    for c in checks:
        if c["ratio"] is not None:
            p(f"| {c['check']}: {c['op']} {c['target']:g}× | {fmt_range(c['ratio'])} | "
              f"{c['rounds_meeting_target']} of {c['rounds']} | **{c['met']}** |")
        else:
            p(f"| {c['check']} | {NONE} | {c['rounds_meeting_target']} of {c['rounds']} | "
              f"**{c['met']}** |")
    p("")
    met = [c["met"] for c in checks]
    p(f"**{met.count('yes')} of {len(met)} targets met.**")
    qd1 = per_round.get("randwrite-qd1", {})
    if "nbdkit-memory" in qd1 and "device-direct" in qd1:
        floor = ratio_stats(qd1["nbdkit-memory"], qd1["device-direct"], "lat_p50_us")
        p("")
        p("Context for (a): an NBD server that does no I/O at all (nbdkit memory) answers a "
          "QD1 4K write in " + fmt_range(floor) + " the device's write latency: the round trip "
          "alone, before any server writes anything.")
    p("")
    if verify:
        p("## (c) Write, then verify (crc32c)")
        p("")
        if meta.get("verify_desc"):
            p(meta["verify_desc"])
            p("")
        p("| system | round | blocks written | read back wrong | SAN wrong after flush/drain | "
          "throttled writes | destaged | outcome |")
        p("|---|---:|---:|---:|---:|---:|---:|---|")
        for s, rows in verify.items():
            for v in rows:
                p(f"| {LABELS.get(s, s)} | {v['round']} | {fmt_int(v['written_blocks'])} | "
                  f"{fmt_int(v['verify_errors'])} | {fmt_int(v.get('san_verify_errors'))} | "
                  f"{fmt_int(v.get('throttled_writes'))} | {fmt_bytes(v.get('destaged_bytes'))} | "
                  f"{v['verdict']} |")
        p("")
        for s, rows in verify.items():
            firsts = [v.get("first_error") or v.get("san_first_error") for v in rows]
            firsts = [f for f in firsts if f]
            notes = [v["note"] for v in rows if v.get("note")]
            if firsts:
                p(f"- {LABELS.get(s, s)}: first error seen: `{firsts[0]}`")
            for n in notes[:1]:
                p(f"- {LABELS.get(s, s)}: {n}")
        p("")
    if nrounds > 1 and per_round:
        report.iops_per_round(p, nrounds, "system")
        for w in per_round:
            for s in systems:
                if s in per_round[w]:
                    p(f"| {w} | {LABELS.get(s, s)} | "
                      + " | ".join("HUNG" if r.get("hung") else fmt_int(r.get("iops")) for r in per_round[w][s]) + " |")
    out = {"meta": meta, "rounds": nrounds, "systems": systems, "workloads": workloads,
           "results": results, "results_per_round": per_round, "ratios": ratios,
           "verify": verify, "checks": checks}
    write_report(args, L, meta, out, "PASS" if met and all(v == "yes" for v in met) else "FAIL")
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("scrape")
    s.add_argument("url")
    s.add_argument("out")
    s.set_defaults(func=cmd_scrape)
    r = sub.add_parser("summarize")
    r.add_argument("--runs", required=True)
    r.add_argument("--rounds", type=int, default=1)
    r.add_argument("--systems", required=True)
    r.add_argument("--workloads", required=True)
    add_output_args(r)
    r.set_defaults(func=cmd_summarize)
    args = ap.parse_args()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
