"""Writing files so that readers never see half of one."""

import os
import tempfile
from pathlib import Path


def atomic_write(path: Path, write) -> None:
    """Calls ``write(temporary_path)``, then renames over ``path``: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
