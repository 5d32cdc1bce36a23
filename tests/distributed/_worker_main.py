"""Entry point of one spawned test rank: ``python _worker_main.py JOB_DIR RANK``.

Loads the target function from its file by path (independent of pytest's import mode and
of ``sys.path``), runs it and saves ``{"ok": bool, "value" | "error": ...}`` to
``JOB_DIR/result_RANK.pt``. It exits with ``os._exit`` so that a process group left in a
bad state by a failing test cannot hang the interpreter's shutdown.
"""

from __future__ import annotations

import faulthandler
import importlib.util
import os
import sys
import traceback


def main() -> None:
    job_dir, rank = sys.argv[1], int(sys.argv[2])
    out = os.path.join(job_dir, f"result_{rank}.pt")
    try:
        import torch

        torch.set_num_threads(1)
        spec = torch.load(os.path.join(job_dir, "spec.pt"), weights_only=False)
        # a hang shows up in the log as every thread's stack, shortly before the parent's kill
        faulthandler.dump_traceback_later(spec["dump_after"], exit=False)
        mod_spec = importlib.util.spec_from_file_location(f"_spar_dist_job_{rank}", spec["file"])
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
        ctx = dict(spec["kwargs"], rank=rank, world=spec["world"], job_dir=job_dir)
        ctx["init_method"] = "file://" + os.path.join(job_dir, "rendezvous")
        value = getattr(module, spec["func"])(ctx)
        torch.save({"ok": True, "value": value}, out)
    except BaseException:
        import torch

        torch.save({"ok": False, "error": traceback.format_exc()}, out)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
