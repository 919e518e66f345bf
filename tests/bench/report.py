#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Helper for tests/bench/nbd-passthrough.sh (standard library only).

  report.py sample PID OUT [--interval S]
      Append "EPOCH_NS TICKS" lines to OUT, where TICKS = utime + stime of
      process PID (all threads; /proc/PID/stat fields 14 and 15, clock
      ticks). The first line is written at once, then one every S seconds
      (default 0.02), and a last one on SIGTERM/SIGINT or when PID exits.
      With --threads FILE, also record every thread seen (every 0.25 s) with
      its name and Cpus_allowed_list.

  report.py threads --cpu N FILE...
      Summarise those thread files; exit 1 if a thread was not pinned to N.

  report.py summarize --runs DIR --servers A,B,C --workloads SPEC,... \
            [--rounds N] --clk-tck N --md OUT.md --json OUT.json \
            [--meta KEY=VALUE ...]
      Read DIR/SERVER.WORKLOAD.rROUND.fio.json and .cpu for ROUND = 1..N
      (default 1; a raw folder from before rounds existed, without the
      .rROUND part, is read as round 1), print the Markdown report on stdout
      and write OUT.md and OUT.json. SPEC is NAME:RW:BS:IODEPTH.

      Each metric is reported as its median across rounds (each metric's
      median taken separately). flashtierd / nbdkit file ratios are computed
      per round (both servers ran in the same round, close in time) and
      reported as the median of the per-round ratios with their min-max
      range; the targets are checked against that median. The JSON keeps
      every round's numbers (results_per_round) and ratios (ratios).

Server CPU per I/O is taken over fio's measured window only (after
ramp_time): [timestamp_ms - runtime, timestamp_ms] from fio's JSON, with the
tick counter linearly interpolated between samples, divided by the I/Os fio
completed in that window (total_ios). The plain before/after-the-whole-job
value (includes connect, ramp and teardown) is kept in the JSON as
cpu_us_per_io_whole_job.
"""
import argparse
import json
import os
import signal
import statistics
import sys
import time

SERVER_LABELS = {
    "flashtierd": "flashtierd",
    "nbdkit-file": "nbdkit file",
    "nbdkit-memory": "nbdkit memory (ceiling)",
}
BASE = "nbdkit-file"
CANDIDATE = "flashtierd"
CEILING = "nbdkit-memory"


# --------------------------------------------------------------------------
# sampler

def read_ticks(pid):
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read().decode("ascii", "replace")
    # comm (field 2) may contain spaces and parentheses: split after the last ')'.
    rest = data[data.rindex(")") + 2:].split()
    # rest[0] is field 3 (state), so field 14 (utime) is rest[11], 15 (stime) rest[12].
    return int(rest[11]) + int(rest[12])


def cmd_sample(args):
    stop = False

    def on_signal(_signo, _frame):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    threads = {}
    next_scan = 0.0
    with open(args.out, "w", buffering=1) as out:
        while True:
            try:
                ticks = read_ticks(args.pid)
            except (OSError, ValueError):
                break  # process gone
            out.write(f"{time.time_ns()} {ticks}\n")
            now = time.monotonic()
            if args.threads and (now >= next_scan or stop):
                scan_threads(args.pid, threads)
                next_scan = now + args.thread_interval
            if stop:
                break
            time.sleep(args.interval)
    if args.threads:
        with open(args.threads, "w") as f:
            for tid, (comm, cpus) in sorted(threads.items()):
                f.write(f"{tid}\t{comm}\t{cpus}\n")
    return 0


def scan_threads(pid, seen):
    """Record every thread of @pid with its name and allowed CPUs."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                comm = f.read().strip()
            cpus = ""
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("Cpus_allowed_list:"):
                        cpus = line.split(":", 1)[1].strip()
                        break
        except OSError:
            continue  # thread exited meanwhile
        seen[int(tid)] = (comm, cpus)


def cmd_threads(args):
    """Summarise thread files from 'sample --threads'; exit 1 if a thread
    was allowed on CPUs other than --cpu."""
    seen = {}
    for path in args.files:
        try:
            with open(path) as f:
                for line in f:
                    tid, comm, cpus = line.rstrip("\n").split("\t")
                    seen[int(tid)] = (comm, cpus)
        except FileNotFoundError:
            continue
    names = {}
    bad = []
    for tid, (comm, cpus) in sorted(seen.items()):
        # io_uring workers are named iou-wrk-TID / iou-sqp-TID: group them.
        key = comm.rsplit("-", 1)[0] + "-*" if comm.startswith("iou-") else comm
        names[key] = names.get(key, 0) + 1
        if cpus != str(args.cpu):
            bad.append(f"{tid} ({comm}) on CPUs {cpus}")
    summary = ", ".join(f"{n}×{k}" for k, n in sorted(names.items()))
    print(f"{len(seen)} threads seen during the runs: {summary}")
    for b in bad:
        print(f"NOT PINNED to CPU {args.cpu}: thread {b}")
    return 1 if bad else 0


# --------------------------------------------------------------------------
# summary

def load_samples(path):
    samples = []
    try:
        f = open(path)
    except OSError as e:
        raise SystemExit(f"report.py: {e}")
    with f:
        for line in f:
            parts = line.split()
            if len(parts) == 2:
                samples.append((int(parts[0]) / 1e6, int(parts[1])))  # (ms, ticks)
    if len(samples) < 2:
        raise SystemExit(f"report.py: {path}: fewer than two CPU samples")
    return samples


def ticks_at(samples, t_ms):
    """Tick counter at wall time t_ms, linearly interpolated."""
    if t_ms <= samples[0][0]:
        return float(samples[0][1])
    if t_ms >= samples[-1][0]:
        return float(samples[-1][1])
    lo, hi = 0, len(samples) - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if samples[mid][0] <= t_ms:
            lo = mid
        else:
            hi = mid
    (t0, c0), (t1, c1) = samples[lo], samples[hi]
    if t1 == t0:
        return float(c1)
    return c0 + (c1 - c0) * (t_ms - t0) / (t1 - t0)


def load_fio(path):
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise SystemExit(f"report.py: {e}")
    # fio may print informational lines ("fio: connected to NBD server") before the JSON.
    start = text.find("{")
    if start < 0:
        raise SystemExit(f"report.py: {path}: no JSON in fio output")
    return json.loads(text[start:])


def summarize_run(fio, samples, rw, clk_tck):
    job = fio["jobs"][0]
    if job.get("error"):
        raise SystemExit(f"report.py: fio job {job.get('jobname')} reported error {job['error']}")
    sect = job["write"] if "write" in rw else job["read"]
    total_ios = job["read"]["total_ios"] + job["write"]["total_ios"]
    iops = job["read"]["iops"] + job["write"]["iops"]
    runtime_ms = max(job["read"]["runtime"], job["write"]["runtime"])
    pct = sect["clat_ns"].get("percentile", {})
    end_ms = float(fio["timestamp_ms"])
    start_ms = end_ms - runtime_ms
    window_ticks = ticks_at(samples, end_ms) - ticks_at(samples, start_ms)
    whole_ticks = samples[-1][1] - samples[0][1]
    covered = samples[0][0] <= start_ms and samples[-1][0] >= end_ms
    res = {
        "iops": iops,
        "total_ios": total_ios,
        "runtime_ms": runtime_ms,
        "bw_MiBps": (job["read"]["bw_bytes"] + job["write"]["bw_bytes"]) / 2**20,
        "clat_p50_us": pct.get("50.000000", 0) / 1000.0,
        "clat_p99_us": pct.get("99.000000", 0) / 1000.0,
        "clat_p99_9_us": pct.get("99.900000", 0) / 1000.0,
        "clat_mean_us": sect["clat_ns"]["mean"] / 1000.0,
        "server_cpu_ticks_window": window_ticks,
        "server_cpu_pct": 100.0 * window_ticks / clk_tck / (runtime_ms / 1000.0) if runtime_ms else None,
        "cpu_us_per_io": (window_ticks / clk_tck * 1e6 / total_ios) if total_ios else None,
        "cpu_us_per_io_whole_job": (whole_ticks / clk_tck * 1e6 / total_ios) if total_ios else None,
        "cpu_window_covered_by_samples": covered,
        "client_cpu_pct": job.get("usr_cpu", 0) + job.get("sys_cpu", 0),
        "fio_timestamp_ms": fio["timestamp_ms"],
    }
    return res


def fmt_int(v, none="n/a"):
    return none if v is None else f"{v:,.0f}"


def fmt_f(v, nd=1, none="n/a"):
    return none if v is None else f"{v:,.{nd}f}"


def fmt_ratio(v):
    return "n/a" if v is None else f"{v:.2f}×"


def fmt_ratio_range(st, fmt=fmt_ratio, none="n/a"):
    """'1.32× (1.10–1.45)': median of the per-round ratios (as @fmt writes
    it) and their range; @none without a median."""
    if st is None or st["median"] is None:
        return none
    if st["n"] < 2:
        return fmt(st["median"])
    return f"{fmt(st['median'])} ({st['min']:.2f}–{st['max']:.2f})"


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def median(values):
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


# Per-run numbers whose median across rounds is reported (each separately).
MEDIAN_KEYS = (
    "iops", "total_ios", "runtime_ms", "bw_MiBps",
    "clat_p50_us", "clat_p99_us", "clat_p99_9_us", "clat_mean_us",
    "server_cpu_ticks_window", "server_cpu_pct", "cpu_us_per_io",
    "cpu_us_per_io_whole_job", "client_cpu_pct",
)
# Metrics with a flashtierd / nbdkit file ratio column.
RATIO_KEYS = ("iops", "clat_p50_us", "clat_p99_us", "cpu_us_per_io")


def median_of_runs(runs):
    med = {k: median(r[k] for r in runs) for k in MEDIAN_KEYS}
    med["cpu_window_covered_by_samples"] = all(r["cpu_window_covered_by_samples"] for r in runs)
    return med


def ratio_stats(cand_runs, base_runs, key):
    """Per-round ratios of metric @key (candidate / base) and their median,
    min and max."""
    per_round = [ratio(c.get(key), b.get(key)) for c, b in zip(cand_runs, base_runs)]
    vals = [v for v in per_round if v is not None]
    return {
        "median": statistics.median(vals) if vals else None,
        "min": min(vals) if vals else None,
        "max": max(vals) if vals else None,
        "n": len(vals),
        "rounds": per_round,
    }


def meets(v, op, thr):
    return v >= thr if op == ">=" else v <= thr


def parse_meta(pairs):
    """--meta KEY=VALUE arguments -> dict."""
    meta = {}
    for kv in pairs or []:
        k, _, v = kv.partition("=")
        meta[k] = v
    return meta


def iops_per_round(p, nrounds, what):
    """Heading and table header of the "IOPS per round" section."""
    p("")
    p("## IOPS per round")
    p("")
    p(f"| workload | {what} | " + " | ".join(f"r{i}" for i in range(1, nrounds + 1)) + " |")
    p("|---|---|" + "---:|" * nrounds)


def write_report(args, lines, meta, out, verdict):
    """Finish the Markdown (meta "notes" last), write it to --md and stdout,
    @out to --json and @verdict to --verdict-file."""
    if meta.get("notes"):
        lines.append("")
        lines.append(meta["notes"])
    md = "\n".join(lines) + "\n"
    with open(args.md, "w") as f:
        f.write(md)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=2)
        f.write("\n")
    sys.stdout.write(md)
    if args.verdict_file:
        with open(args.verdict_file, "w") as f:
            f.write(verdict + "\n")


def add_output_args(r):
    """The summarize options both reports share."""
    r.add_argument("--clk-tck", type=int, required=True)
    r.add_argument("--md", required=True)
    r.add_argument("--json", required=True)
    r.add_argument("--meta", action="append")
    r.add_argument("--verdict-file")


def run_prefix(runs_dir, server, workload, rnd):
    prefix = os.path.join(runs_dir, f"{server}.{workload}.r{rnd}")
    legacy = os.path.join(runs_dir, f"{server}.{workload}")
    if (rnd == 1 and not os.path.exists(prefix + ".fio.json")
            and os.path.exists(legacy + ".fio.json")):
        return legacy  # raw folder written before rounds existed
    return prefix


def thread_summaries(runs_dir, server, nrounds):
    """One line per server: the thread summary of each server start."""
    per_round = []
    for rnd in range(1, nrounds + 1):
        for name in (f"{server}.r{rnd}.threads-summary",
                     f"{server}.threads-summary" if rnd == 1 else None):
            if name and os.path.exists(os.path.join(runs_dir, name)):
                with open(os.path.join(runs_dir, name)) as f:
                    per_round.append((rnd, " / ".join(f.read().split("\n")).strip(" /")))
                break
    if not per_round:
        return None
    if len(per_round) == nrounds and len({t for _, t in per_round}) == 1:
        return per_round[0][1] + (f" (same in each of the {nrounds} rounds)" if nrounds > 1 else "")
    return "; ".join(f"r{rnd}: {t}" for rnd, t in per_round)


def cmd_summarize(args):
    meta = parse_meta(args.meta)
    servers = [s for s in args.servers.split(",") if s]
    workloads = []
    for spec in args.workloads.split(","):
        name, rw, bs, qd = spec.split(":")
        workloads.append({"name": name, "rw": rw, "bs": bs, "iodepth": int(qd)})
    nrounds = args.rounds
    if nrounds < 1:
        raise SystemExit("report.py: --rounds must be >= 1")
    meta.setdefault("rounds", str(nrounds))

    per_round = {}   # server -> workload -> [run of round 1, round 2, ...]
    results = {}     # server -> workload -> per-metric medians
    for s in servers:
        per_round[s] = {}
        results[s] = {}
        for w in workloads:
            runs = []
            for rnd in range(1, nrounds + 1):
                prefix = run_prefix(args.runs, s, w["name"], rnd)
                fio = load_fio(prefix + ".fio.json")
                samples = load_samples(prefix + ".cpu")
                run = summarize_run(fio, samples, w["rw"], args.clk_tck)
                run["round"] = rnd
                runs.append(run)
            per_round[s][w["name"]] = runs
            results[s][w["name"]] = median_of_runs(runs)

    have_pair = CANDIDATE in results and BASE in results
    ratios = {}      # workload -> key -> ratio_stats
    if have_pair:
        for w in workloads:
            ratios[w["name"]] = {
                key: ratio_stats(per_round[CANDIDATE][w["name"]], per_round[BASE][w["name"]], key)
                for key in RATIO_KEYS}

    checks = []
    lines = []
    p = lines.append
    p(f"# flashtierd pass-through vs nbdkit ({meta.get('date', '')}, "
      f"{nrounds} round{'s' if nrounds != 1 else ''})")
    p("")
    order = ", ".join(SERVER_LABELS.get(s, s) for s in servers)
    if nrounds > 1:
        p(f"- rounds: {nrounds}; in each round every server is started, measured on every "
          f"workload and stopped, in turn ({order}), so drift of the machine hits all "
          f"servers alike")
    else:
        p(f"- rounds: 1 (one run per server: {order}); ratios from a single round are noisy")
    for key, label in (
        ("flashtierd", "flashtierd"),
        ("nbdkit", "nbdkit"),
        ("fio", "fio"),
        ("kernel", "kernel"),
        ("cpu_model", "CPU"),
        ("setup", "setup"),
        ("fio_params", "fio job"),
        ("loadavg_start", "load average at start"),
        ("loadavg_end", "load average at end"),
    ):
        if meta.get(key):
            p(f"- {label}: {meta[key]}")
    for srv in servers:
        t = thread_summaries(args.runs, srv, nrounds)
        if t:
            meta.setdefault("threads", {})[srv] = t
    if meta.get("threads"):
        p("- server threads seen while fio ran: " + "; ".join(
            f"{SERVER_LABELS.get(k, k)}: {v}" for k, v in meta["threads"].items()))
    p("")
    p("Latencies are fio completion latency (clat) percentiles. Server CPU is "
      "utime+stime of the whole server process over fio's measured window, "
      "divided by the I/Os fio completed in it. "
      + (f"Every number is the median over the {nrounds} rounds (each metric's median "
         "taken separately). Ratios are flashtierd / nbdkit file, computed per round; "
         "shown is the median of the per-round ratios with their min–max range in "
         "parentheses, and the targets use that median."
         if nrounds > 1 else "Ratios are flashtierd / nbdkit file."))
    p("")

    ratio_col = "flashtierd / nbdkit file" + (" (min–max)" if nrounds > 1 else "")
    for w in workloads:
        name = w["name"]
        p(f"## {name} ({w['rw']}, bs={w['bs']}, QD{w['iodepth']})")
        p("")
        header = ["metric (median)" if nrounds > 1 else "metric"] + \
            [SERVER_LABELS.get(s, s) for s in servers]
        if have_pair:
            header.append(ratio_col)
        p("| " + " | ".join(header) + " |")
        p("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
        rows = (
            ("IOPS", "iops", fmt_int),
            ("p50 clat (µs)", "clat_p50_us", fmt_f),
            ("p99 clat (µs)", "clat_p99_us", fmt_f),
            ("server CPU (µs/IO)", "cpu_us_per_io", lambda v: fmt_f(v, 2)),
            ("server CPU (% of one core)", "server_cpu_pct", lambda v: fmt_f(v, 0)),
            ("fio CPU (% of one core)", "client_cpu_pct", lambda v: fmt_f(v, 0)),
        )
        wr = ratios.get(name, {})
        for label, key, fmt in rows:
            cells = [label] + [fmt(results[s][name][key]) for s in servers]
            if have_pair:
                cells.append(fmt_ratio_range(wr[key]) if key in wr else "")
            p("| " + " | ".join(cells) + " |")
        p("")
        # targets, against the median of the per-round ratios
        wchecks = []
        if w["iodepth"] >= 32:
            wchecks.append(("IOPS", "iops", ">=", args.target_iops))
        if w["iodepth"] == 1:
            wchecks.append(("p50 clat", "clat_p50_us", "<=", args.target_p50))
        wchecks.append(("server CPU/IO", "cpu_us_per_io", "<=", args.target_cpu))
        for label, key, op, thr in wchecks:
            st = wr.get(key)
            r = st["median"] if st else None
            verdict = "n/a" if r is None else ("PASS" if meets(r, op, thr) else "FAIL")
            rounds_ok = sum(1 for v in st["rounds"] if v is not None and meets(v, op, thr)) if st else 0
            checks.append({"workload": name, "metric": label, "key": key, "op": op,
                           "target": thr, "ratio": r,
                           "ratio_min": st["min"] if st else None,
                           "ratio_max": st["max"] if st else None,
                           "ratio_rounds": st["rounds"] if st else [],
                           "rounds_meeting_target": rounds_ok,
                           "verdict": verdict})
            extra = f" ({rounds_ok} of {nrounds} rounds meet it)" if nrounds > 1 and st else ""
            p(f"- target: flashtierd {label} {op} {thr:.2f}× nbdkit file: "
              f"{fmt_ratio_range(st)} → **{verdict}**{extra}")
        p("")

    p("## Targets")
    p("")
    if nrounds > 1:
        p("Verdicts use the median of the per-round ratios.")
        p("")
        p(f"| workload | check | target | {ratio_col} | rounds meeting target | result |")
        p("|---|---|---:|---:|---:|---|")
    else:
        p("| workload | check | target | flashtierd / nbdkit file | result |")
        p("|---|---|---:|---:|---|")
    for c in checks:
        st = ratios.get(c["workload"], {}).get(c["key"])
        rounds_cell = f" {c['rounds_meeting_target']} of {nrounds} |" if nrounds > 1 else ""
        p(f"| {c['workload']} | {c['metric']} | {c['op']} {c['target']:.2f}× | "
          f"{fmt_ratio_range(st)} |{rounds_cell} {c['verdict']} |")
    p("")
    verdicts = [c["verdict"] for c in checks]
    if not verdicts or all(v == "n/a" for v in verdicts):
        overall = "n/a"
    elif "FAIL" in verdicts:
        overall = "FAIL"
    else:
        overall = "PASS"
    npass = verdicts.count("PASS")
    p(f"**Overall: {overall}** ({npass} of {len(verdicts)} checks pass)")

    if nrounds > 1:
        iops_per_round(p, nrounds, "server")
        for w in workloads:
            name = w["name"]
            for s in servers:
                p(f"| {name} | {SERVER_LABELS.get(s, s)} | "
                  + " | ".join(fmt_int(r["iops"]) for r in per_round[s][name]) + " |")
            if have_pair:
                p(f"| {name} | flashtierd / nbdkit file | "
                  + " | ".join(fmt_ratio(v) for v in ratios[name]["iops"]["rounds"]) + " |")

    out = {
        "meta": meta,
        "rounds": nrounds,
        "workloads": workloads,
        "servers": servers,
        # per server and workload: the median across rounds of each metric
        "results": results,
        # per server and workload: one entry per round, as measured
        "results_per_round": per_round,
        # per workload and metric: flashtierd / nbdkit file, per round and summarised
        "ratios": ratios,
        "targets": {"qd32_iops_ratio_min": args.target_iops,
                    "qd1_p50_ratio_max": args.target_p50,
                    "cpu_per_io_ratio_max": args.target_cpu,
                    "checked_against": "median of per-round ratios"},
        "checks": checks,
        "overall": overall,
    }
    write_report(args, lines, meta, out, overall)
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sample")
    s.add_argument("pid", type=int)
    s.add_argument("out")
    s.add_argument("--interval", type=float, default=0.02)
    s.add_argument("--threads", help="also write TID, name and allowed CPUs of every thread seen")
    s.add_argument("--thread-interval", type=float, default=0.25)
    s.set_defaults(func=cmd_sample)
    t = sub.add_parser("threads")
    t.add_argument("--cpu", required=True)
    t.add_argument("files", nargs="*")
    t.set_defaults(func=cmd_threads)
    r = sub.add_parser("summarize")
    r.add_argument("--runs", required=True)
    r.add_argument("--servers", required=True)
    r.add_argument("--workloads", required=True)
    r.add_argument("--rounds", type=int, default=1,
                   help="number of rounds (files SERVER.WORKLOAD.rN.*), default 1")
    add_output_args(r)
    r.add_argument("--target-iops", type=float, default=1.0)
    r.add_argument("--target-p50", type=float, default=1.1)
    r.add_argument("--target-cpu", type=float, default=0.7)
    r.set_defaults(func=cmd_summarize)
    args = ap.parse_args()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
