"""Attacks of the second security round that need no ComfyUI: a recipe from outside that steers a
model loader or freezes the server, a .npy header that lies about its size to the panel's input
budget, and odd Host and Origin headers on the standalone run server (a process of its own,
reached on raw sockets)."""

from __future__ import annotations

import importlib.util
import json
import socket

import pytest

from discomfort.panel.io import PanelLimits, input_bytes
from discomfort.recipes import Recipe, RecipeError, check_recipe, types_digest
from discomfort.remote.origin import refusal

# The run server and the panel are aiohttp handlers and panel images decode to torch tensors: the
# suite on 3.10/3.13 has neither, and those tests skip there with the reason.
needs_aiohttp = pytest.mark.skipif(importlib.util.find_spec("aiohttp") is None, reason="needs aiohttp (the server routes)")
needs_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch (panel images)")

COMBO = [["sd15.safetensors", "sdxl.safetensors"], {}]
INFO = {
    "CheckpointLoaderSimple": {"input": {"required": {"ckpt_name": COMBO}}, "output": ["MODEL", "CLIP", "VAE"],
                               "output_node": False},
    "DiffusersLoader": {"input": {"required": {"model_path": [["a/model"], {}]}}, "output": ["MODEL", "CLIP", "VAE"],
                        "output_node": False},
    "ModelSamplingSD3": {"input": {"required": {"model": ["MODEL", {}], "shift": ["FLOAT", {}]}}, "output": ["MODEL"],
                         "output_node": False},
    "RegexReplace": {"input": {"required": {"string": ["STRING", {}], "regex_pattern": ["STRING", {}],
                                            "replace": ["STRING", {}]}}, "output": ["STRING"], "output_node": False},
    "Sampling": {"input": {"required": {"sampler_name": ["COMBO", {"options": ["euler"]}]}}, "output": ["SAMPLER"],
                 "output_node": False},
    "DiscomfortPort": {"input": {"required": {"unique_id": ["STRING", {}]}}, "output": ["*"], "output_node": True},
}


def from_outside(nodes: dict, output: list, inputs: dict | None = None) -> Recipe:
    """A recipe as a hostile server returns it: JSON with the right types digest."""
    types = {e["class_type"] for e in nodes.values()} - {"DiscomfortPort"}
    return Recipe.from_json({"discomfort_recipe": 1, "key": "model", "nodes": nodes, "output": output,
                             "inputs": inputs or {}, "types": types_digest(types, INFO)})


# ---------------------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("cls,name", [("DiffusersLoader", "model_path"), ("CheckpointLoaderSimple", "ckpt_name"),
                                      ("Sampling", "sampler_name")])
def test_a_recipe_cannot_feed_a_run_value_into_a_choice(cls, name):
    """A port's output is of any type, so ComfyUI accepts its link into a combo and never checks
    the value against the list: a string the hostile server also returned ("../../..", an absolute
    path) would reach DiffusersLoader's os.path.join. Refused: choices must be literals."""
    recipe = from_outside({"1": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "path"}},
                           "2": {"class_type": cls, "inputs": {name: ["1", 0]}}}, ["2", 0],
                          {"path": {"key": "path"}})
    with pytest.raises(RecipeError, match=f"node 2 \\({cls}\\) gets its choice '{name}' through a link"):
        check_recipe(recipe, INFO)
    literal = from_outside({"2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15.safetensors"}},
                            "3": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["2", 0], "shift": 3.0}}},
                           ["3", 0])
    assert check_recipe(literal, INFO) == 2  # the control: literal choices, as ComfyUI's editor sends them


def test_a_recipe_cannot_run_a_regular_expression():
    """re holds the interpreter lock: (a+)+$ on 40 a's freezes ComfyUI, routes and cancel included."""
    recipe = from_outside({"1": {"class_type": "RegexReplace", "inputs": {
        "string": "a" * 40 + "!", "regex_pattern": "(a+)+$", "replace": ""}}}, ["1", 0])
    with pytest.raises(RecipeError, match=r"node 1 \(RegexReplace\) runs a regular expression"):
        check_recipe(recipe, INFO)


def test_a_recipe_keeps_only_class_inputs_and_title():
    """An ``is_changed`` in a prompt's node replaces its IS_CHANGED in ComfyUI's cache key (a stale
    cached output would be taken); other fields are not the recipe's to set."""
    recipe = from_outside({"2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15.safetensors"},
                                 "is_changed": [1], "_meta": {"title": "t" * 10_000, "x": 1}, "extra": {"a": 1}}},
                          ["2", 0])
    assert recipe.nodes["2"] == {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15.safetensors"},
                                 "_meta": {"title": "t" * 200}}


@pytest.mark.parametrize("slot", [3, -1, 1 << 70])
def test_a_recipe_links_only_to_outputs_that_exist(slot):
    """A negative slot is a Python index from the end in ComfyUI; one past the end fails its
    validation with an IndexError: both refused naming the link."""
    recipe = from_outside({"2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15.safetensors"}},
                           "3": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["2", slot], "shift": 3.0}}},
                          ["3", 0])
    with pytest.raises(RecipeError, match=f"links to output {slot} of node 2 .* which has 3"):
        check_recipe(recipe, INFO)
    out = from_outside({"2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15.safetensors"}}},
                       ["2", slot])
    with pytest.raises(RecipeError, match=f"links to output {slot} of node 2"):
        check_recipe(out, INFO)


# ------------------------------------------------------------------------------------ panel inputs


def _npy(path, shape) -> None:
    header = ("{'descr': '<f4', 'fortran_order': False, 'shape': %r, }" % (shape,)).ljust(118) + "\n"
    path.write_bytes(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + bytes(64))


@pytest.mark.parametrize("shape", [(2 ** 61, 4, 3), (3, 2 ** 62 + 1), (2 ** 32, 2 ** 32)])
def test_a_npy_header_cannot_wrap_the_input_budget(tmp_path, shape):
    """An int64 product of these shapes wraps to 0 or below: summed into the run's decoded bytes it
    took up to 2^65 off the budget. (numpy then refuses to load such a file, and the inputs bound
    before it were within the budget: a miscount that decoded nothing more, now refused first.)"""
    _npy(tmp_path / "x.npy", shape)
    got = input_bytes(str(tmp_path / "x.npy"), "*", PanelLimits())
    assert got > PanelLimits().max_run_input_bytes and got == 4 * shape[0] * shape[1] * (shape[2:] or (1,))[0]


def test_a_npy_header_cannot_give_a_negative_size(tmp_path):
    _npy(tmp_path / "x.npy", (-4, 5))
    with pytest.raises(Exception, match="negative dimension"):
        input_bytes(str(tmp_path / "x.npy"), "*", PanelLimits())


# ------------------------------------------------------------------------------------ Host, Origin


@pytest.mark.parametrize("host", ["127.0.0.1:８１８８", "127.0.0.1:٨١", "127.0.0.1%evil.example",
                                  "127.0.0.1%evil.example:80"])
def test_odd_host_forms_are_refused(host):
    """Non-ASCII digits in a port (int() reads them), a zone on an IPv4 address."""
    assert refusal(host, None) is not None


@needs_aiohttp
def test_two_origin_headers_are_refused_on_the_standalone_server():
    """A good Origin first and a foreign one after: the first was the one looked at (a proxy may
    keep the last). No browser sends two: refused."""
    from discomfort.remote import standalone

    with standalone.start("a secret of more than sixteen characters") as (url, _proc):
        port = int(url.rsplit(":", 1)[1])
        answers = []
        for origins in ([f"http://127.0.0.1:{port}", "http://evil.example"], [f"http://127.0.0.1:{port}"]):
            with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
                lines = [f"GET /discomfort/runs/{'ab' * 16} HTTP/1.1", f"Host: 127.0.0.1:{port}",
                         *[f"Origin: {o}" for o in origins], "Connection: close", "", ""]
                s.sendall("\r\n".join(lines).encode())
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            answers.append((int(head.split()[1]), json.loads(body)))
    assert answers[0][0] == 403 and answers[0][1]["type"] == "ForbiddenHost", answers[0]
    assert "one Origin header" in answers[0][1]["error"]
    assert answers[1][0] == 401, answers[1]  # the control: one good Origin reaches the route (no token)


# ------------------------------------------------------------------------------- client addresses


class _Request:
    def __init__(self, remote: str) -> None:
        self.remote = remote


@needs_aiohttp
def test_one_ipv6_client_takes_no_more_panel_slots_than_one_address():
    """A client handed a /64 (any IPv6 machine) may source each request from another address of
    it, and a dual-stack server sees an IPv4 client as ::ffff:a.b.c.d: each counts as one client."""
    from discomfort.panel.runner import PanelServer
    from discomfort.panel.runs import PanelRun, RunBook
    from discomfort.remote.limits import HTTPRefusal, client_address

    book = RunBook(max_runs=16, per_address=2, kept=32, cancel_grace=30.0)
    for n, remote in enumerate(["2001:db8:1:2::10", "2001:db8:1:2:ffff::99"]):
        book.add(PanelRun(f"{n:032x}", f"t{n}", PanelServer._address(_Request(remote)), ["w"], 1, None))
    with pytest.raises(HTTPRefusal, match="from this address are going"):
        book.check_room(PanelServer._address(_Request("2001:db8:1:2:abcd::1")))
    book.check_room(PanelServer._address(_Request("2001:db8:1:3::1")))  # another /64: another client
    assert client_address("::ffff:192.0.2.7") == client_address("192.0.2.7") == "192.0.2.7"
    assert client_address("2001:db8:1:2::10") == client_address("2001:db8:1:2:ffff::99") == "2001:db8:1:2::/64"
    assert client_address("::1") == "::1"


def test_a_recipe_cannot_record_audio_from_a_file():
    """RecordAudio (ComfyUI's audio nodes, where torchaudio is installed) reads the file its
    AUDIO_RECORD value names with get_annotated_filepath: no list, no VALIDATE_INPUTS, so
    "../../home/user/secret.wav" or "x.wav [output]" reached any audio file. Its name is not Load*."""
    info = {**INFO, "RecordAudio": {"input": {"required": {"audio": ["AUDIO_RECORD", {}]}}, "output": ["AUDIO"],
                                    "output_node": False},
            "AudioRecorder": {"input": {"required": {"audio": ["AUDIO_RECORD", {}]}}, "output": ["AUDIO"],
                              "output_node": False}}
    for cls in ("RecordAudio", "AudioRecorder"):  # by name, and by its widget's type under another name
        recipe = Recipe.from_json({"discomfort_recipe": 1, "key": "voice", "output": ["1", 0], "nodes": {
            "1": {"class_type": cls, "inputs": {"audio": "../../../home/user/secret.wav"}}},
            "types": types_digest({cls}, info)})
        with pytest.raises(RecipeError, match=f"node 1 \\({cls}\\) reads a file named by"):
            check_recipe(recipe, info)


# ------------------------------------------------------------------------ run server: values out


SECRET = "a secret of more than sixteen characters"


@pytest.fixture(scope="module")
def out_server(tmp_path_factory):
    """(url, pid, log) of a standalone run server: 2 values sent at once per client, 2 s stall."""
    import os

    from discomfort.remote import standalone

    env = {k: v for k, v in os.environ.items() if not k.startswith("DISCOMFORT_REMOTE_")}
    env.update(DISCOMFORT_REMOTE_MAX_VALUE="16M", DISCOMFORT_REMOTE_MAX_RUN_BYTES="16M",
               DISCOMFORT_REMOTE_MAX_CLIENT_BYTES="16M", DISCOMFORT_REMOTE_MAX_DOWNLOADS_PER_CLIENT="2",
               DISCOMFORT_REMOTE_STALL="2", DISCOMFORT_REMOTE_MIN_RATE="0")
    log = tmp_path_factory.mktemp("out_server") / "stderr.log"
    with standalone.start(SECRET, env=env, stderr=open(log, "w")) as (url, proc):
        yield url, proc.pid, log
    assert "unexpected error" not in log.read_text()


def _held_get(url: str, run_id: str, token: str, key: str) -> tuple[socket.socket, bytes]:
    """A GET whose answer is not read past its head (a 4 KiB receive buffer); a refusal's body is read."""
    port = int(url.rsplit(":", 1)[1])
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(30)
    s.connect(("127.0.0.1", port))
    s.sendall(f"GET /discomfort/runs/{run_id}/values/{key} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
              f"X-Discomfort-Token: {token}\r\n\r\n".encode())
    got = b""
    while b"\r\n\r\n" not in got:
        got += s.recv(1024)
    head, _, body = got.partition(b"\r\n\r\n")
    if b" 200 " not in head.split(b"\r\n")[0]:
        length = int(next(h.split(b":")[1] for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")))
        while len(body) < length:
            body += s.recv(length - len(body))
    return s, head + b"\r\n\r\n" + body


def _until(check, what: str, seconds: float = 30.0) -> None:
    """Wait for a condition another process makes true (a failure after ``seconds``, never a pass)."""
    import time

    end = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < end, f"gave up waiting: {what}"
        time.sleep(0.05)


def _rss_anon_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon")) / 1024


@needs_aiohttp
def test_a_client_cannot_hold_copies_of_a_value_by_not_reading(out_server):
    """Each GET is sent from a copy of the value (a guarded read), held until the client has read
    it: 10 GETs of a 12 MiB value that read nothing held 10 copies, for ever (60 MiB against a
    64 MiB limit: 31 -> 633 MiB). Now the third at once is 429, and a GET left unread for the
    stall limit is cut, its copy dropped, its slot given back."""
    import numpy as np

    from discomfort.remote import RemoteContext

    url, pid, log = out_server
    with RemoteContext(url, secret=SECRET) as rc:
        rc.save("v", np.ones(12 << 20, dtype=np.uint8))
        rss0 = _rss_anon_mib(pid)
        held = [_held_get(url, rc.run_id, rc._token, "v") for _ in range(4)]
        statuses = [first.split(b" ", 2)[1] for _, first in held]
        assert statuses == [b"200", b"200", b"429", b"429"], statuses
        assert b"DISCOMFORT_REMOTE_MAX_DOWNLOADS_PER_CLIENT" in held[2][1]
        assert _rss_anon_mib(pid) - rss0 < 3 * 12, "more copies than GETs allowed"
        _until(lambda: log.read_text().count("not read fast enough") == 2, "the unread GETs are cut")
        for s, _ in held[:2]:  # unread: cut after the stall limit, before all was sent
            got = 0
            while chunk := s.recv(1 << 20):
                got += len(chunk)
            assert got < 12 << 20
        for s, _ in held:
            s.close()
        assert np.count_nonzero(rc.load("v")) == 12 << 20  # the slots came back: a reader is served


@needs_aiohttp
def test_a_run_registers_a_bounded_number_of_prompts(out_server):
    """Every registration rewrites the run's whole set of digests (sorted JSON in the store), on
    the server's event loop: 8000 took each request from 1 to 7.5 ms, growing without end. Now
    the 257th at once is 429; one already there, or one after a revoke, is taken."""
    import hashlib

    import requests

    from discomfort.remote import RemoteContext
    from discomfort.remote import server

    MAX_PROMPTS = getattr(server, "MAX_PROMPTS", 256)

    url, _pid, _log = out_server
    with RemoteContext(url, secret=SECRET) as rc, requests.Session() as http:
        http.headers["X-Discomfort-Token"] = rc._token
        route = f"{url}/discomfort/runs/{rc.run_id}/prompts"
        digests = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(MAX_PROMPTS + 1)]
        assert {http.post(route, json={"digest": d}, timeout=30).status_code for d in digests[:-1]} == {200}
        over = http.post(route, json={"digest": digests[-1]}, timeout=30)
        assert over.status_code == 429 and "revoke" in over.json()["error"], over.text
        assert http.post(route, json={"digest": digests[0]}, timeout=30).status_code == 200  # already there
        assert http.delete(f"{route}/{digests[0]}", timeout=30).status_code == 200
        assert http.post(route, json={"digest": digests[-1]}, timeout=30).status_code == 200


def test_a_recipe_port_in_any_mode_never_saves_into_the_run():
    """A port of a recipe from outside in OUTPUT (or an odd) mode, naming another run and a key of
    the victim's: stitched, a port the value passes through is left out, and any other becomes a
    loader of this run's declared input: no node of the prompt can save, or name another run."""
    from discomfort.recipes import stitch_recipe

    def port(uid, **extra):
        return {"class_type": "DiscomfortPort", "inputs": {"unique_id": uid, "run_id": "victim", **extra}}

    nodes = {"1": port("strength", port_mode="OUTPUT"),
             "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15.safetensors"}},
             "3": port("result", port_mode="PASSTHRU", input_data=["2", 0]),
             "4": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["3", 0], "shift": ["1", 0]}},
             "5": port("model", port_mode="SAVE EVERYTHING", input_data=["4", 0])}
    recipe = from_outside(nodes, ["5", 0], {"strength": {"key": "strength"}})
    consumer = {"7": {"class_type": "DiscomfortDataLoader", "inputs": {"run_id": "mine", "unique_id": "model"}},
                "8": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "out", "input_data": ["7", 0]}}}
    out = stitch_recipe(consumer, "7", recipe, "mine", INFO)
    ports = [nid for nid, e in out.items() if e["class_type"] == "DiscomfortPort"]
    assert ports == ["8"], out  # the consumer's own port only
    runs = {e["inputs"].get("run_id") for e in out.values()} - {None}
    assert runs == {"mine"}, out
    assert [e["inputs"]["unique_id"] for e in out.values() if e["class_type"] == "DiscomfortDataLoader"] == ["strength"]


@pytest.mark.parametrize("cls", ["PrimitiveNode", "Reroute", "Note", "GroupNode", "workflow>x"])
def test_frontend_only_nodes_are_not_node_types(cls):
    recipe = from_outside({"1": {"class_type": cls, "inputs": {}}}, ["1", 0])
    with pytest.raises(RecipeError, match=f"node 1 \\({cls}\\) is not a node type of this ComfyUI"):
        check_recipe(recipe, INFO)


def test_panel_input_names_cannot_leave_the_input_folder(tmp_path):
    """Symlinks in input/ to a file or a folder outside it, a FIFO, names with .., %2e%2e, NUL,
    a drive or a backslash: none is read, none is listed."""
    import os

    from discomfort.panel.io import InvalidName, list_files, safe_file

    inputs, secret = tmp_path / "input", tmp_path / "secret"
    inputs.mkdir()
    secret.mkdir()
    (secret / "key.txt").write_text("private")
    (inputs / "ok.txt").write_text("fine")
    (inputs / "file.txt").symlink_to(secret / "key.txt")
    (inputs / "dir").symlink_to(secret)
    os.mkfifo(inputs / "pipe.txt")
    lim = PanelLimits()
    assert safe_file(inputs, "ok.txt", "input", lim).endswith("ok.txt")  # the control
    for name in ("file.txt", "dir/key.txt"):
        with pytest.raises(InvalidName, match="leads out of its folder"):
            safe_file(inputs, name, "input", lim)
    with pytest.raises(FileNotFoundError):
        safe_file(inputs, "pipe.txt", "input", lim)
    for name in ("../secret/key.txt", "a/../../secret/key.txt", "/etc/passwd", "C:x.txt", "a\\..\\b.txt",
                 "ok.txt\x00.png", "~/x.txt", "./ok.txt"):
        with pytest.raises(InvalidName):
            safe_file(inputs, name, "input", lim)
    with pytest.raises(FileNotFoundError):
        safe_file(inputs, "%2e%2e/secret/key.txt", "input", lim)  # no decoding: a plain name
    assert [f["name"] for f in list_files(inputs, (".txt",), lim)] == ["ok.txt"]


@needs_torch
@pytest.mark.parametrize("name", ["evil.png", "evil.jpg", "evil.webp"])
def test_a_panel_image_is_read_only_as_its_extension_says(tmp_path, monkeypatch, name):
    """Pillow goes by the content: PostScript uploaded as "evil.png" (ComfyUI's /upload/image takes
    any bytes) was opened as EPS and handed to Ghostscript, a PostScript interpreter, when the
    panel decoded it ("Unable to locate Ghostscript" where none is installed). Now only the
    format its extension names is read: 400 before any decoder runs."""
    from PIL import EpsImagePlugin, Image

    from discomfort.errors import DiscomfortError
    from discomfort.panel.io import load_input

    ran: list = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: ran.append(a) or Image.new("RGB", (1, 1)).im)
    path = tmp_path / name
    path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\n(pwned) print showpage\n")
    with pytest.raises(DiscomfortError, match="image \\(only its extension's format is read\\)"):
        input_bytes(str(path), "IMAGE", PanelLimits())
    with pytest.raises(DiscomfortError, match="only its extension's format"):
        load_input(str(path), "IMAGE", PanelLimits())
    assert ran == []
    Image.new("RGB", (4, 4)).save(tmp_path / "ok.png")  # the control
    assert tuple(load_input(str(tmp_path / "ok.png"), "IMAGE", PanelLimits()).shape) == (1, 4, 4, 3)


@needs_aiohttp
def test_long_polls_on_one_run_are_capped():
    """Anyone may start a run and hold its token; thousands of polls on it each took a connection
    and a waiter, and every event answered them all. The 17th waiting at once is 429; the others
    are answered by the next event, and a poll after them waits again."""
    import asyncio

    from discomfort.panel.runs import MAX_POLLS, PanelRun
    from discomfort.remote.limits import HTTPRefusal

    async def attack() -> tuple[list, BaseException | None, int]:
        run = PanelRun("ab" * 16, "t", "127.0.0.1", ["w"], 1, None, loop=asyncio.get_running_loop())
        waiting = [asyncio.create_task(run.wait_after(0, 30)) for _ in range(MAX_POLLS)]
        while run.polls < MAX_POLLS:
            await asyncio.sleep(0)  # let each task reach its wait
        refused = None
        try:
            await run.wait_after(0, 30)
        except HTTPRefusal as exc:
            refused = exc
        run.publish({"kind": "node"})
        answers = await asyncio.gather(*waiting)
        return answers, refused, run.polls

    answers, refused, left = asyncio.run(attack())
    assert refused is not None and refused.status == 429 and "polls are waiting" in str(refused)
    assert [len(a[0]) for a in answers] == [1] * MAX_POLLS and left == 0


def test_a_deeply_nested_recipe_is_a_recipe_error():
    """A mapping nested 100,000 deep in a node's input (or recipes in recipes) raised RecursionError."""
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(RecipeError, match="nested too deeply"):
        from_outside({"1": {"class_type": "ModelSamplingSD3", "inputs": {"shift": deep}}}, ["1", 0])
