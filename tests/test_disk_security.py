"""Other local users against a run's files: the disk root checked like OpenSSH's StrictModes,
private run directories and object files, and planted shared-memory names. Attackers are real
second users (forked children that drop to `nobody`); victims are root or another uid.

Root bypasses permission checks, so where a permission is what is tested the victim runs as a
non-root uid too; O_EXCL and ownership checks hold for root as well.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import struct
import tempfile

import pytest

from _helpers import leftovers
from _workers import as_user
from discomfort import errors

MiB = 1 << 20
NOBODY = 65534
VICTIM = 4242  # a uid of no account: enough for the kernel's permission checks

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as other users")


@pytest.fixture
def shared_tmp():
    """A directory under /tmp that other uids can reach (tmp_path's parents are root's, 0700)."""
    made = []

    def make(mode: int, uid: int = 0) -> str:
        path = tempfile.mkdtemp(prefix="dcf-sec-", dir="/tmp")
        os.chown(path, uid, uid)
        os.chmod(path, mode)
        made.append(path)
        return path

    yield make
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


def _extent(meta: bytes) -> bytes:
    """A well-formed one-buffer object file, as an attacker would plant it."""
    body = struct.pack("<IIQQQ", 0x4F464344, 1, 64, len(meta), 0) + struct.pack("<QQ", 64 + len(meta), 4)
    data = body.ljust(64, b"\0") + meta + b"EVIL"
    return data.ljust(4096, b"\0")


# ---- the disk root --------------------------------------------------------------------------


@needs_root
def test_world_writable_root_without_sticky_bit_is_refused_despite_an_attacker(store_mod, shared_tmp):
    """The attack: a 0777 root. `nobody` plants the run directory with an object file in it;
    the victim refuses the root at create time and nothing of the attacker's is used."""
    root = shared_tmp(0o777)
    run_id = "a" + secrets.token_hex(12)
    planted = os.path.join(root, f"dcf-{run_id}")

    def plant():
        os.mkdir(planted, 0o777)
        with open(os.path.join(planted, f"{1:016x}.obj"), "wb") as fh:
            fh.write(_extent(b"attacker's pickle"))
        os.symlink("/etc/passwd", os.path.join(planted, f"{2:016x}.obj"))
        return "planted"

    assert as_user(NOBODY, plant) == "planted"
    with pytest.raises(errors.UnsafeDirectoryError, match="without the sticky bit.*chmod 700") as info:
        store_mod.Store.create(run_id, ram_budget=0, disk_root=root)
    assert "\n" not in str(info.value) and root in str(info.value)
    assert isinstance(info.value, errors.StoreAccessError)
    assert leftovers(run_id) == []  # refused before its control segment existed
    # the attacker's files are as they were: never adopted, chmod'ed or removed
    assert os.stat(planted).st_uid == NOBODY and sorted(os.listdir(planted)) == [f"{1:016x}.obj", f"{2:016x}.obj"]


@needs_root
def test_root_of_another_user_is_refused(store_mod, shared_tmp, run_id):
    root = shared_tmp(0o700, uid=NOBODY)
    with pytest.raises(errors.UnsafeDirectoryError, match=f"belongs to uid {NOBODY}"):
        store_mod.Store.create(run_id, ram_budget=0, disk_root=root)
    assert leftovers(run_id) == [] and os.listdir(root) == []


def test_symlink_and_non_directory_roots_are_refused(store_mod, tmp_path, run_id):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(errors.UnsafeDirectoryError, match="symbolic link"):
        store_mod.Store.create(run_id, ram_budget=0, disk_root=str(link))
    afile = tmp_path / "file"
    afile.write_bytes(b"")
    with pytest.raises(errors.UnsafeDirectoryError, match="not a directory"):
        store_mod.Store.create(run_id, ram_budget=0, disk_root=str(afile))
    group_writable = tmp_path / "gw"
    group_writable.mkdir()
    group_writable.chmod(0o770)
    with pytest.raises(errors.UnsafeDirectoryError, match="mode 0770"):
        store_mod.Store.create(run_id, ram_budget=0, disk_root=str(group_writable))
    assert leftovers(run_id) == [] and os.listdir(real) == []


def test_private_root_works_and_objects_are_private(store_mod, tmp_path, run_id):
    root = tmp_path / "root"
    root.mkdir(mode=0o700)
    store = store_mod.Store.create(run_id, ram_budget=0, disk_root=str(root))
    try:
        store.put("k", b"m", [b"v" * 100_000])
        st = os.lstat(store.disk_dir)
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.geteuid()
        (name,) = os.listdir(store.disk_dir)
        assert stat.S_IMODE(os.lstat(os.path.join(store.disk_dir, name)).st_mode) == 0o600
        assert bytes(store.get("k")[1][0][:3]) == b"vvv"
    finally:
        store.destroy()
    assert leftovers(run_id, disk_root=str(root)) == []


def test_missing_root_is_made_private(store_mod, tmp_path, run_id):
    root = tmp_path / "a" / "b"
    store = store_mod.Store.create(run_id, ram_budget=0, disk_root=str(root))
    try:
        assert stat.S_IMODE(os.stat(root).st_mode) == 0o700
    finally:
        store.destroy()


@needs_root
def test_sticky_shared_root_works_and_others_cannot_touch_a_non_root_victims_run(store_mod, shared_tmp):
    """A /tmp-like 1777 root: the victim (a non-root uid) gets a 0700 run directory that `nobody`
    can neither rename, enter, plant into nor empty; the victim's data stays intact."""
    root = shared_tmp(0o1777)
    run_id = "s" + secrets.token_hex(12)
    go_r, go_w = os.pipe()  # the victim waits until the attacker has tried
    ready_r, ready_w = os.pipe()
    payload = os.urandom(200_000)

    def victim():
        store = store_mod.Store.create(run_id, ram_budget=0, disk_root=root)
        try:
            store.put("k", b"meta", [payload])
            st = os.lstat(store.disk_dir)
            os.write(ready_w, b"r")
            os.read(go_r, 1)
            meta, views, info = store.get("k")
            ok = meta == b"meta" and bytes(views[0]) == payload and info["tier"] == "disk"
            return f"mode {stat.S_IMODE(st.st_mode):o} uid {st.st_uid} intact {ok}"
        finally:
            store.destroy()

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the victim, in a child of its own so that the attacker runs meanwhile
        os.close(r)
        try:
            os.setgroups([])
            os.setgid(VICTIM)
            os.setuid(VICTIM)
            out = victim()
        except BaseException as exc:
            out = f"raised {type(exc).__name__}: {exc}"
        os.write(w, out.encode())
        os._exit(0)
    os.close(w)
    assert os.read(ready_r, 1) == b"r"
    run_dir = os.path.join(root, f"dcf-{run_id}")

    def attack():
        results = []
        for name, op in [("rename", lambda: os.rename(run_dir, os.path.join(root, "moved"))),
                         ("rmdir", lambda: os.rmdir(run_dir)),
                         ("list", lambda: os.listdir(run_dir)),
                         ("plant", lambda: open(os.path.join(run_dir, f"{9:016x}.obj"), "xb").close())]:
            try:
                op()
                results.append(f"{name}:done")
            except PermissionError:
                results.append(f"{name}:denied")
        return " ".join(results)

    assert as_user(NOBODY, attack) == "rename:denied rmdir:denied list:denied plant:denied"
    os.write(go_w, b"g")
    with os.fdopen(r, "rb") as fh:
        out = fh.read().decode()
    os.waitpid(pid, 0)
    assert out == f"mode 700 uid {VICTIM} intact True", out
    assert leftovers(run_id, disk_root=root) == []


@needs_root
def test_an_existing_run_directory_is_never_reused(store_mod, shared_tmp):
    root = shared_tmp(0o1777)
    run_id = "e" + secrets.token_hex(12)
    planted = os.path.join(root, f"dcf-{run_id}")
    assert as_user(NOBODY, lambda: os.mkdir(planted, 0o777) or "made") == "made"
    with pytest.raises(FileExistsError, match="refusing to reuse it"):
        store_mod.Store.create(run_id, ram_budget=0, disk_root=root)
    assert leftovers(run_id) == [] and os.stat(planted).st_uid == NOBODY


# ---- object files ------------------------------------------------------------------------------


@pytest.mark.parametrize("swap", ["other-owner", "group-readable", "symlink", "fifo"])
def test_a_swapped_object_file_is_refused_never_read(store_mod, make_store, swap):
    """Whatever replaces an object's file (here: root doing what only a compromise could) is
    refused by fstat before its bytes are mapped or read, naming the key and the file."""
    store = make_store(ram_budget=0)
    store.put("big", b"mine", [b"x" * 100_000])
    store.put("small", b"mine", [b"y" * 10])
    for key in ("big", "small"):
        path = os.path.join(store.disk_dir, f"{store.info(key)['version'] - 1:016x}.obj")
        assert os.path.exists(path)
        os.unlink(path)
        if swap == "symlink":
            evil = path + ".target"
            with open(evil, "wb") as fh:
                fh.write(_extent(b"attacker"))
            os.symlink(evil, path)
        elif swap == "fifo":
            os.mkfifo(path, 0o600)
        else:
            with open(path, "wb") as fh:
                fh.write(_extent(b"attacker"))
            if swap == "other-owner":
                os.chown(path, NOBODY, NOBODY)
            else:
                os.chmod(path, 0o640)
        for call in (store.get, store.info):
            with pytest.raises(errors.StoreAccessError) as info:
                call(key)
            assert repr(key) in str(info.value) and path in str(info.value), str(info.value)
        os.unlink(path)
        if swap == "symlink":
            os.unlink(path + ".target")


# ---- planted shared-memory names ------------------------------------------------------------------


def _plant(names: list[str]) -> str:
    for name in names:
        fd = os.open(f"/dev/shm/{name}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, b"attacker")
        os.close(fd)
    return "planted"


def _remove_planted(names: list[str]) -> None:
    for name in names:
        try:
            os.unlink(f"/dev/shm/{name}")
        except FileNotFoundError:
            pass


def _untouched(names: list[str]) -> bool:
    for name in names:
        st = os.lstat(f"/dev/shm/{name}")
        with open(f"/dev/shm/{name}", "rb") as fh:
            if st.st_uid != NOBODY or fh.read() != b"attacker":
                return False
    return True


@needs_root
def test_a_planted_chunk_name_is_skipped_not_removed(store_mod, tmp_path):
    """Root could remove nobody's file: it must not. The save takes the next chunk name, and the
    planted file is left exactly as it was (O_EXCL fails on it for root too)."""
    run_id = "p" + secrets.token_hex(12)
    planted = [f"dcf-{run_id}.c0"]
    try:
        assert as_user(NOBODY, lambda: _plant(planted)) == "planted"
        store = store_mod.Store.create(run_id, ram_budget=256 * MiB, disk_root=str(tmp_path))
        try:
            store.put("k", b"", [b"z" * MiB])
            info = store.info("k")
            assert info["tier"] == "ram" and info["chunk"] == 1
            assert bytes(store.get("k")[1][0]) == b"z" * MiB
        finally:
            store.destroy()
        assert _untouched(planted)
        assert leftovers(run_id, disk_root=str(tmp_path)) == planted  # nothing of the run's own
    finally:
        _remove_planted(planted)


@needs_root
@pytest.mark.parametrize("taken", ["c0", "all"])
def test_planted_chunk_names_do_not_fail_a_non_root_victims_saves(store_mod, shared_tmp, taken):
    """nobody plants the run's next chunk names (or all 64); the victim, another non-root user who
    can neither remove nor open them, still saves: in another chunk, or on the disk tier."""
    run_id = "q" + secrets.token_hex(12)
    planted = [f"dcf-{run_id}.c{k}" for k in (range(64) if taken == "all" else [0])]
    root = shared_tmp(0o700, uid=VICTIM)

    def victim():
        store = store_mod.Store.create(run_id, ram_budget=256 * MiB, disk_root=root)
        try:
            store.put("k", b"", [b"q" * MiB])
            store.put("k2", b"", [b"r" * 100])
            info = store.info("k")
            ok = bytes(store.get("k")[1][0]) == b"q" * MiB and bytes(store.get("k2")[1][0]) == b"r" * 100
            return f"{info['tier']} {info['chunk']} {ok}"
        finally:
            store.destroy()

    try:
        assert as_user(NOBODY, lambda: _plant(planted)) == "planted"
        out = as_user(VICTIM, victim)
        assert out == ("ram 1 True" if taken == "c0" else "disk None True"), out
        assert _untouched(planted)
        assert sorted(leftovers(run_id, disk_root=root)) == sorted(planted)  # nothing of the run's own
    finally:
        _remove_planted(planted)


@needs_root
def test_a_pooled_chunk_skips_a_planted_name(store_mod, tmp_path):
    """Leasing a pooled chunk renames it without replacing: a planted name keeps the pooled
    file for the next name instead of failing or removing the planted one."""
    first = "u" + secrets.token_hex(12)
    second = "v" + secrets.token_hex(12)
    planted = [f"dcf-{second}.c0"]
    try:
        store_mod.set_pool_limit(None)
        a = store_mod.Store.create(first, ram_budget=64 * MiB, disk_root=str(tmp_path), pool=True)
        a.put("k", b"", [b"a" * MiB])
        a.destroy()
        pooled = store_mod.pool_info()["bytes"]
        assert pooled >= 64 * MiB
        assert as_user(NOBODY, lambda: _plant(planted)) == "planted"
        b = store_mod.Store.create(second, ram_budget=64 * MiB, disk_root=str(tmp_path), pool=True)
        try:
            b.put("k", b"", [b"b" * MiB])
            assert b.info("k")["tier"] == "ram" and b.info("k")["chunk"] == 1
            assert store_mod.pool_info()["bytes"] == pooled - 64 * MiB  # leased, under another name
        finally:
            b.destroy()
        assert _untouched(planted)
        assert leftovers(second, disk_root=str(tmp_path)) == planted
    finally:
        _remove_planted(planted)
        store_mod.release_pool()


def test_doctor_says_what_to_change_about_an_unsafe_disk_root(tmp_path):
    from discomfort import doctor

    root = tmp_path / "open"
    root.mkdir()
    root.chmod(0o777)
    report = doctor.collect(disk_root=str(root), cgroup_root=str(tmp_path / "none"))
    assert any("without the sticky bit" in line and "chmod 700" in line for line in report["advice"])
    root.chmod(0o700)
    report = doctor.collect(disk_root=str(root), cgroup_root=str(tmp_path / "none"))
    assert not any("disk root" in line and "sticky" in line for line in report["advice"])
