"""Where the GPU waits for the host: idle gaps in a profiled step and what the host was doing.

    report(trace_json_path, out_path)   # a torch.profiler chrome trace, recorded with
                                        # activities CPU + CUDA and with_stack=True

A gap is the time between the end of one kernel (or copy, or memset) and the start of the next
on the device. For each gap over `min_us` the report names the kernel that ended it and the
Python frames (this repository's and DeepSpeed's, innermost last) that launched it: the host
reached that launch late. Also: each kernel's launcher (innermost operator and Python frames), what
the host ran during the largest gaps, and the frames torch.compile resumed after a graph break. Gaps are summed by that launch site, and every host synchronisation
(stream/device/event synchronise, device-to-host copies) is listed with the frames that called
it, since each one drains the queue and leaves the GPU idle until the host catches up.
"""

import bisect
import json
from collections import defaultdict

SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
OURS = ("megamoe/", "deepspeed/", "bench/", "torch/optim/", "torch/nn/utils/clip_grad")


class Stacks:
    """Python frames (or, with cat="cpu_op", torch's operators) of each host thread, nested: the
    frames (ours) enclosing a host time."""

    def __init__(self, events: list[dict], cat: str = "python_function"):
        self.threads = {}
        for e in sorted((e for e in events if e.get("cat") == cat and e.get("ph") == "X"),
                        key=lambda e: (e["ts"], -e.get("dur", 0))):
            starts, evs, parent, open_ = self.threads.setdefault(e.get("tid"), ([], [], [], []))
            end = e["ts"] + e.get("dur", 0)
            while open_ and evs[open_[-1]]["ts"] + evs[open_[-1]].get("dur", 0) < end:
                open_.pop()
            parent.append(open_[-1] if open_ else -1)
            open_.append(len(evs))
            starts.append(e["ts"])
            evs.append(e)

    def frames(self, tid, t: float, ours=OURS) -> list[str]:
        """This repository's (and DeepSpeed's, torch.optim's) frames enclosing t, outermost first;
        ours=None: every frame's name."""
        if tid not in self.threads:
            return []
        starts, evs, parent, _ = self.threads[tid]
        i = bisect.bisect_right(starts, t) - 1
        while i >= 0 and evs[i]["ts"] + evs[i].get("dur", 0) < t:
            i = parent[i]
        names = []
        while i >= 0:
            name = evs[i]["name"]
            for k in ours or ("",):
                if k in name:
                    names.append(name[name.index(k):])
                    break
            i = parent[i]
        return names[::-1]


def site(frames: list[str], depth: int = 3) -> str:
    return " > ".join(frames[-depth:]) if frames else "(no frame of ours)"


def analyse(trace: dict, min_us: float = 20.0) -> dict:
    events = trace["traceEvents"]
    device = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                    key=lambda e: e["ts"])
    runtime = {e["args"]["correlation"]: e for e in events
               if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    stacks, ops = Stacks(events), Stacks(events, "cpu_op")
    host = defaultdict(list)  # Python functions and operators by thread
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in ("python_function", "cpu_op"):
            host[e.get("tid")].append(e)
    gaps, by_site, small, counts, times = [], defaultdict(float), 0.0, defaultdict(int), defaultdict(float)
    launchers = defaultdict(lambda: defaultdict(int))  # kernel -> (operator, frames) -> launches
    for e in device:
        counts[e["name"][:90]] += 1
        times[e["name"][:90]] += e.get("dur", 0)
        launch = runtime.get(e.get("args", {}).get("correlation"))
        if launch:  # the innermost operator and the two innermost Python frames around the launch
            op = (ops.frames(launch.get("tid"), launch["ts"], None) or ["?"])[-1]
            py = " > ".join(f.split("/")[-1][:60] for f in stacks.frames(launch.get("tid"), launch["ts"], None)[-2:])
            launchers[e["name"][:90]][f"{op}  {py}"] += 1
    busy = sum(e.get("dur", 0) for e in device)
    span = (device[-1]["ts"] + device[-1].get("dur", 0) - device[0]["ts"]) if device else 0.0
    for prev, cur in zip(device, device[1:]):
        gap = cur["ts"] - (prev["ts"] + prev.get("dur", 0))
        if gap < min_us:
            small += max(gap, 0.0)
            continue
        launch = runtime.get(cur.get("args", {}).get("correlation"))
        frames = stacks.frames(launch.get("tid"), launch["ts"]) if launch else []
        busy_host = []  # what the host ran in the gap's length before the launch, longest overlap first
        if launch:
            lo, hi = launch["ts"] - gap, launch["ts"]
            for h in host.get(launch.get("tid"), []):
                overlap = min(hi, h["ts"] + h.get("dur", 0)) - max(lo, h["ts"])
                if overlap > 0.2 * gap and h.get("dur", 0) < 20 * gap:
                    busy_host.append((overlap, h["name"][-90:]))
        gaps.append({"gap_us": gap, "next": cur["name"][:80], "launch": launch["name"] if launch else "?",
                     "site": site(frames, 4), "host": sorted(busy_host, reverse=True)[:6]})
        by_site[site(frames, 2)] += gap
    syncs = []
    for e in events:
        if e.get("cat") != "cuda_runtime":
            continue
        name = e.get("name", "")
        d2h = name.startswith("cudaMemcpy") and e.get("args", {}).get("kind") in (2, "DtoH")
        if name in SYNC_CALLS or d2h or (name.startswith("cudaMemcpy") and "Async" not in name):
            syncs.append({"call": name, "dur_us": e.get("dur", 0), "site": site(stacks.frames(e.get("tid"), e["ts"]), 4)})
    resumed = defaultdict(int)  # frames torch.compile resumed after a graph break, by name
    for e in events:
        if e.get("cat") == "python_function" and "torch_dynamo_resume_in" in e.get("name", ""):
            resumed[e["name"][-120:]] += 1
    return {"device_span_us": span, "graph_breaks": sorted(resumed.items(), key=lambda kv: -kv[1]), "device_busy_us": busy, "idle_us": span - busy, "n_device_ops": len(device),
            "small_gaps_us": small, "most_launched": sorted(counts.items(), key=lambda kv: -kv[1])[:25],
            "longest": [(name, us, counts[name]) for name, us in sorted(times.items(), key=lambda kv: -kv[1])],
            "gaps_over_min_us": sum(g["gap_us"] for g in gaps), "n_gaps": len(gaps),
            "gaps": sorted(gaps, key=lambda g: -g["gap_us"]),
            "by_site": sorted(by_site.items(), key=lambda kv: -kv[1]), "syncs": syncs,
            "launchers": {k: sorted(v.items(), key=lambda kv: -kv[1])[:3] for k, v in launchers.items()}}


def report(trace_path: str, out_path: str, min_us: float = 20.0, top: int = 30) -> dict:
    with open(trace_path) as f:
        a = analyse(json.load(f), min_us)
    lines = [f"device span {a['device_span_us'] / 1e3:.2f} ms, kernels busy {a['device_busy_us'] / 1e3:.2f} ms, "
             f"idle {a['idle_us'] / 1e3:.2f} ms; {a['n_gaps']} gaps over {min_us:.0f} us sum to "
             f"{a['gaps_over_min_us'] / 1e3:.2f} ms",
             f"{a['n_device_ops']} kernels/copies/memsets; the gaps under {min_us:.0f} us between them (launch "
             f"latency, one kernel draining before the next fills the GPU) sum to {a['small_gaps_us'] / 1e3:.2f} ms",
             ""]
    if a["graph_breaks"]:  # each one splits a compiled region: the host runs Python between the parts
        lines += ["graph breaks (frames torch.compile resumed, calls):"]
        lines += [f"{n:6d}x  {name}" for name, n in a["graph_breaks"][:top]] + [""]
    lines += ["idle by launch site (the host reached these late):"]
    lines += [f"{us / 1e3:9.3f} ms  {s}" for s, us in a["by_site"][:top]]
    lines += ["", f"largest gaps (of {a['n_gaps']}):"]
    for i, g in enumerate(a["gaps"][:top]):
        lines.append(f"{g['gap_us'] / 1e3:9.3f} ms  before {g['next']}  [{g['launch']}]  {g['site']}")
        if i < 5:  # what the host was running instead (over a fifth of the gap, not far longer than it)
            lines += [f"              host {us / 1e3:6.3f} ms in {name}" for us, name in g["host"]]
    lines += ["", "device time by kernel (each kernel once: no profiler ranges):"]
    lines += [f"{us / 1e3:9.3f} ms {n:5d}x  {name}" for name, us, n in a["longest"][:60]]
    lines += ["", "most launched:"] + [f"{n:6d}x  {name}" for name, n in a["most_launched"]]
    lines += ["", "who launched them (innermost operator, innermost Python frames; the 40 longest and the most launched):"]
    for name in dict.fromkeys([n for n, _, _ in a["longest"][:40]] + [n for n, _ in a["most_launched"]]):
        lines += [f"  {name}"] + [f"      {n:5d}x  {who}" for who, n in a["launchers"].get(name, [])]
    lines += ["", f"host synchronisations ({len(a['syncs'])}):"]
    lines += [f"{s['dur_us'] / 1e3:9.3f} ms  {s['call']}  {s['site']}" for s in a["syncs"][:top]]
    with open(out_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return a
