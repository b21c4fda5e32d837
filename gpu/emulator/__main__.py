"""``python -m refattn.gpu.emulator [selfcheck options]``: the selfcheck, emulated.

Runs :func:`refattn.gpu.selfcheck.main` (same options: ``--quick``, ``--match RE``,
``--seed``, ``--out DIR``) with the emulator's CuPy-like module installed, so the record
it writes names the device ``refattn CPU emulator (not a GPU)`` and carries the kernel
sources' sha256. Then it prints every diagnostic of every launch. Exit status 0 only when
every case passed and no launch reported anything; 2 when the emulator cannot build here.
An emulated record is not a device record: it shows the sources ran on the emulator.
"""
from __future__ import annotations

import sys

from .. import selfcheck
from .native import compiler_status
from .cupy_like import installed


def main(argv=None) -> int:
    status = compiler_status()
    if not status.startswith("ok"):
        print(f"the emulator cannot run here: {status}", file=sys.stderr)
        return 2
    with installed() as cp:
        rc = selfcheck.main(argv)
    findings = [(rec, d) for rec in cp.launches for d in rec.diagnostics]
    stopped = [rec for rec in cp.launches if not rec.completed]
    for rec, d in findings:
        print(f"{rec.kernel}: {d}")
    print(f"emulator: {len(cp.launches)} launches, {len(findings)} diagnostics, "
          f"{len(stopped)} stopped")
    return rc or (1 if findings or stopped else 0)


if __name__ == "__main__":
    sys.exit(main())
