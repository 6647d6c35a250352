"""Immich paths mapped to local ones: nothing outside the mapped root is read, symbolic links included."""
from __future__ import annotations

import os

import pytest

from listener.errors import PermanentJobError
from listener.paths import map_path

REMOTE = "/usr/src/app/upload"


@pytest.fixture
def library(tmp_path):
    """A mapped root with one photo, and a secret file beside (not inside) it."""
    root = tmp_path / "library"
    (root / "thumbs").mkdir(parents=True)
    (root / "thumbs" / "a.jpg").write_bytes(b"photo")
    secret = tmp_path / "secret.txt"
    secret.write_text("not a photo")
    return root, secret


def test_path_inside_the_root_maps(library):
    root, _ = library
    assert map_path(f"{REMOTE}/thumbs/a.jpg", [(REMOTE, root)]) == root / "thumbs" / "a.jpg"


def test_symlink_escaping_the_root_is_refused_and_named(library):
    root, secret = library
    os.symlink(secret, root / "thumbs" / "evil.jpg")
    with pytest.raises(PermanentJobError) as e:
        map_path(f"{REMOTE}/thumbs/evil.jpg", [(REMOTE, root)])
    message = str(e.value)
    assert "thumbs/evil.jpg" in message and str(secret) in message and "symbolic link" in message


def test_symlinked_folder_escaping_the_root_is_refused(library, tmp_path):
    root, _ = library
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "b.jpg").write_bytes(b"photo")
    os.symlink(outside, root / "linked")
    with pytest.raises(PermanentJobError, match="symbolic link"):
        map_path(f"{REMOTE}/linked/b.jpg", [(REMOTE, root)])


def test_symlinks_that_stay_inside_are_followed(library, tmp_path):
    root, _ = library
    os.symlink(root / "thumbs" / "a.jpg", root / "alias.jpg")
    assert map_path(f"{REMOTE}/alias.jpg", [(REMOTE, root)]) == root / "thumbs" / "a.jpg"
    # the mapped root itself may be a link (e.g. /mnt/immich -> a mounted disk)
    link_root = tmp_path / "mnt-immich"
    os.symlink(root, link_root)
    assert map_path(f"{REMOTE}/thumbs/a.jpg", [(REMOTE, link_root)]).read_bytes() == b"photo"


def test_dotdot_and_foreign_prefixes_are_refused(library):
    root, _ = library
    for path in (f"{REMOTE}/../../../etc/passwd", "/etc/passwd", f"{REMOTE}x/a.jpg"):
        with pytest.raises(PermanentJobError, match="outside the mapped roots"):
            map_path(path, [(REMOTE, root)])
