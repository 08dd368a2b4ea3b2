"""Where a jitted step spends its time: the XLA ops of a `jax.profiler` trace, summed by op.

    with jax.profiler.trace(logdir):
        ... run the step n times ...
    profile = read_trace(logdir)
    print(format_profile(profile, steps=n))

Uses the XSpace reader that ships with jaxlib (`jax.profiler.ProfileData`), so no TensorBoard is
needed. On a GPU or TPU the ops are the kernels on the device planes; on CPU they are the host
threads' XLA ops. `busy_ns` is the union of the op intervals: wall time minus it is time the
device sat idle (launch and host overhead), which tells a launch-bound step from a compute-bound one.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import os

from jax.profiler import ProfileData


@dataclasses.dataclass
class OpTime:
    module: str
    op: str
    calls: int
    total_ns: float


@dataclasses.dataclass
class Profile:
    ops: list[OpTime]  # most time first
    busy_ns: float
    span_ns: float  # first op start to last op end


def latest_xspace(logdir: str) -> str:
    paths = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)
    if not paths:
        raise FileNotFoundError(f"no *.xplane.pb trace under {logdir}")
    return max(paths, key=os.path.getmtime)


def _op_events(data: ProfileData):
    """(plane name, hlo_module, hlo_op, start_ns, duration_ns) of every event that names an XLA op."""
    for plane in data.planes:
        for line in plane.lines:
            for event in line.events:
                stats = dict(event.stats)
                if "hlo_op" in stats:
                    yield plane.name, str(stats.get("hlo_module", "?")), str(stats["hlo_op"]), \
                        event.start_ns, event.duration_ns


def read_trace(logdir: str, module_filter: str = "") -> Profile:
    """Sum the op events of the newest trace under `logdir` whose module name contains `module_filter`."""
    events = [e for e in _op_events(ProfileData.from_file(latest_xspace(logdir))) if module_filter in e[1]]
    on_device = [e for e in events if e[0].startswith("/device:")]
    events = on_device or events  # a GPU's host plane also names ops (the launches): count the kernels
    totals: dict[tuple[str, str], list] = collections.defaultdict(lambda: [0, 0.0])
    intervals = []
    for _, module, op, start, duration in events:
        totals[module, op][0] += 1
        totals[module, op][1] += duration
        intervals.append((start, start + duration))
    ops = sorted((OpTime(m, o, c, t) for (m, o), (c, t) in totals.items()), key=lambda r: -r.total_ns)
    return Profile(ops=ops, busy_ns=_union_length(intervals),
                   span_ns=(max(e for _, e in intervals) - min(s for s, _ in intervals)) if intervals else 0.0)


def _union_length(intervals) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def format_profile(profile: Profile, steps: int, wall_ms_per_step: float | None = None, top: int = 25) -> str:
    """A table of the `top` ops by time per step, then the device's busy time against the wall time."""
    total = sum(r.total_ns for r in profile.ops) or 1.0
    lines = [f"{'ms/step':>8} {'share':>6} {'calls/step':>10}  op (module)"]
    for r in profile.ops[:top]:
        lines.append(f"{r.total_ns / 1e6 / steps:8.3f} {100 * r.total_ns / total:5.1f}% {r.calls / steps:10.1f}  "
                     f"{r.op} ({r.module})")
    if len(profile.ops) > top:
        rest = profile.ops[top:]
        rest_ns = sum(r.total_ns for r in rest)
        lines.append(f"{rest_ns / 1e6 / steps:8.3f} {100 * rest_ns / total:5.1f}% "
                     f"{sum(r.calls for r in rest) / steps:10.1f}  {len(rest)} other ops")
    calls = sum(r.calls for r in profile.ops) / steps
    lines.append(f"ops run per step: {calls:.0f}; device busy {profile.busy_ns / 1e6 / steps:.3f} ms per step")
    if wall_ms_per_step:
        idle = max(wall_ms_per_step - profile.busy_ns / 1e6 / steps, 0.0)
        lines.append(f"wall {wall_ms_per_step:.3f} ms per step: the device is idle {idle:.3f} ms of it "
                     f"({100 * idle / wall_ms_per_step:.0f}%: launches, host work, synchronisation)")
    return "\n".join(lines)
