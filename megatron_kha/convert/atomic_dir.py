"""Write a directory so that it appears complete or not at all.

`with atomic_directory(path) as tmp:` yields an empty temporary sibling to fill; on a clean
exit it replaces `path` by rename (an existing one, allowed only when the caller checked
force, is moved aside first and deleted only after the rename). On an exception the
temporary directory is removed and `path` is untouched.
"""
import contextlib
import os
import shutil
import uuid


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.remove(path)


@contextlib.contextmanager
def atomic_directory(path: str):
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{tag}")
    os.makedirs(tmp)
    try:
        yield tmp
        if os.path.lexists(path):
            old = os.path.join(parent, f".{os.path.basename(path)}.old-{tag}")
            os.rename(path, old)
            os.rename(tmp, path)
            _remove(old)
        else:
            os.rename(tmp, path)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
