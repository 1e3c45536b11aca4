"""Writing files so that readers never see half of one."""

import os
import tempfile
from pathlib import Path

from . import distributed


def atomic_write(path: Path, write) -> None:
    """Calls ``write(temporary_path)``, then renames over ``path``: readers never see half a file.

    When sharded (``distributed.py``), only rank 0 writes, between two barriers: no process reads
    the file's old state after another has seen the new one, so all take the same branches.
    """
    distributed.barrier()
    try:
        if distributed.is_main():
            _write(path, write)
    finally:
        distributed.barrier()


def _write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temporary)
        # mkstemp's 0600 would hide the run from the user's group; set after writing, since a
        # writer may recreate the file (safetensors' save_file does)
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
