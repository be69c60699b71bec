"""A small Envoy hot-restart wrapper for bench/hot_restart.py (in the spirit of Envoy's own
restarter/hot-restarter.py, which we do not ship).

    python bench/_hr_restarter.py --envoy BIN --base-id-path FILE --admin-dir DIR -- ENVOY_ARGS...

Starts epoch 0 of Envoy with ``--restart-epoch 0 --use-dynamic-base-id --base-id-path FILE``
(Envoy picks a base id no other Envoy on this host holds; ``--use-dynamic-base-id`` is only
allowed at epoch 0), then each later epoch N with ``--restart-epoch N --base-id <that id>``:
the same base id is what lets epoch N find epoch N-1 (shared memory and the abstract domain
sockets are named after it). Every epoch gets ``--admin-address-path DIR/admin-<N>`` so that the
caller can tell when it is live. ENVOY_ARGS are passed to every epoch unchanged (config, drain
flags, ...); they must not contain ``--disable-hot-restart``.

Signals (as Envoy's restarter):
  SIGHUP   start the next epoch while the current one runs (Envoy's hot restart: the new one takes
           the listening sockets, the old one drains and exits after --parent-shutdown-time-s)
  SIGTERM / SIGINT   terminate every epoch (SIGTERM, then SIGKILL after 3 s) and exit
  SIGCHLD  an epoch that is not the newest exiting is the normal end of its drain; the newest one
           exiting means Envoy is gone: the others are terminated and the restarter exits with
           its code

Events are printed on stdout, one JSON object per line (``t`` is time.monotonic()):
  {"event": "started", "epoch": N, "pid": P, "admin_path": "...", "t": ...}
  {"event": "base_id", "base_id": B, "t": ...}
  {"event": "exited", "epoch": N, "pid": P, "code": C, "t": ...}   (C < 0: killed by signal -C)
  {"event": "refused", "reason": "..."}      (SIGHUP while the previous parent still drains)
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

KILL_GRACE = 3.0


def emit(**kw) -> None:
    kw.setdefault("t", time.monotonic())
    sys.stdout.write(json.dumps(kw) + "\n")
    sys.stdout.flush()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--envoy", required=True, help="path of the envoy binary")
    ap.add_argument("--base-id-path", required=True, help="where epoch 0 writes its dynamic base id")
    ap.add_argument("--admin-dir", required=True, help="directory for each epoch's admin-address file")
    ap.add_argument("envoy_args", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    extra = [a for a in args.envoy_args if a != "--"]
    if "--disable-hot-restart" in extra:
        ap.error("--disable-hot-restart defeats the purpose")

    # every signal is handled synchronously in the loop below (no handler runs at a random point)
    handled = {signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGCHLD}
    signal.pthread_sigmask(signal.SIG_BLOCK, handled)

    epochs: dict[int, subprocess.Popen] = {}  # epoch -> process, while alive
    newest = -1
    base_id: int | None = None
    base_id_path = Path(args.base_id_path)

    def start(epoch: int) -> None:
        nonlocal newest
        admin_path = Path(args.admin_dir) / f"admin-{epoch}"
        argv = [args.envoy, "--restart-epoch", str(epoch), "--admin-address-path", str(admin_path)]
        if epoch == 0:
            argv += ["--use-dynamic-base-id", "--base-id-path", str(base_id_path)]
        else:
            argv += ["--base-id", str(base_id)]
        argv += extra
        # the child must not inherit our blocked signal mask (we are single-threaded: preexec_fn is safe)
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                             preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_SETMASK, set()))  # noqa: PLW1509
        epochs[epoch] = p
        newest = epoch
        emit(event="started", epoch=epoch, pid=p.pid, admin_path=str(admin_path))

    def read_base_id(wait: float) -> int | None:
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                text = base_id_path.read_text().strip()
                if text:
                    return int(text)
            except (OSError, ValueError):
                pass
            if epochs.get(0) is not None and epochs[0].poll() is not None:
                return None
            time.sleep(0.01)
        return None

    def reap() -> int | None:
        """Collect exited epochs; return the newest one's code if it was among them."""
        code_newest = None
        for epoch, p in list(epochs.items()):
            code = p.poll()
            if code is None:
                continue
            del epochs[epoch]
            emit(event="exited", epoch=epoch, pid=p.pid, code=code)
            if epoch == newest:
                code_newest = code
        return code_newest

    def terminate_all() -> None:
        for p in epochs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + KILL_GRACE
        for p in epochs.values():
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        reap()

    start(0)
    base_id = read_base_id(10.0)
    if base_id is None:
        emit(event="error", reason="epoch 0 wrote no base id")
        terminate_all()
        return 1
    emit(event="base_id", base_id=base_id)

    while True:
        info = signal.sigtimedwait(handled, 0.5)
        code = reap()
        if code is not None:  # the newest epoch is gone: nothing serves any more
            emit(event="error", reason=f"newest epoch {newest} exited with {code}")
            terminate_all()
            return code if code > 0 else 1
        if info is None or info.si_signo == signal.SIGCHLD:
            continue
        if info.si_signo == signal.SIGHUP:
            if len(epochs) > 1:  # Envoy keeps two generations at most
                emit(event="refused", reason="previous epoch still draining")
                continue
            start(newest + 1)
        else:  # SIGTERM / SIGINT
            terminate_all()
            return 0


if __name__ == "__main__":
    sys.exit(main())
