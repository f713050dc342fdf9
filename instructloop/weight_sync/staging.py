"""Where a state dict crosses to an engine worker in another process: written once as
safetensors into a staging directory (RAM-backed /dev/shm by default), loaded from there and
deleted. Staging left behind by a process killed mid-load is removed on the next call."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from instructloop.processes import pid_alive

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

STAGING_PREFIX = "instructloop-weights-"


def staging_root(staging_dir: Path | None) -> Path:
    """`staging_dir`, else /dev/shm when present (RAM, no disk I/O), else the temp directory."""
    staging = staging_dir
    if staging is None and Path("/dev/shm").is_dir():
        staging = Path("/dev/shm")
    return Path(staging) if staging is not None else Path(tempfile.gettempdir())


@contextlib.contextmanager
def staged(tensors: Mapping[str, torch.Tensor], root: Path) -> Iterator[Path]:
    """A directory under `root` holding `tensors` as one safetensors file, deleted after."""
    from safetensors.torch import save_file

    remove_orphaned_staging(root)
    # The pid in the name lets a later call tell a killed process's leftovers from live staging.
    tmp = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=root))
    try:
        cpu = {n: t.detach().to("cpu").contiguous() for n, t in tensors.items()}
        save_file(cpu, str(tmp / "model.safetensors"))
        del cpu
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_orphaned_staging(staging: Path) -> None:
    """Delete staging left by processes that died mid-load (SIGKILL skips `finally`): in
    RAM-backed /dev/shm each would hold a whole model's weights until reboot."""
    for d in staging.glob(f"{STAGING_PREFIX}*"):
        pid = d.name[len(STAGING_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            log.info("removing staging %s left by dead process %s", d, pid)
            shutil.rmtree(d, ignore_errors=True)
