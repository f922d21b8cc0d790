"""The studio as a Hugging Face Space, driven through its API (gradio_client) as its owner, another signed-in user and
an anonymous visitor: only the owner trains, stops, deletes, uploads, previews, saves presets, evaluates and
publishes; no endpoint hands a caller a file of the server or another user's upload; visitors see and chat with the
public runs only; one visitor's Stop ends only their own answer.

The app runs offline with gradio's real OAuth routes (SYSTEM=spaces and the OAUTH_* variables, see
/work/shared/measured-notes.md); callers present the session cookie a sign-in leaves, signed as the server signs it.
The base model is a tiny one served from a local Hugging Face cache under a Hub id: on a Space, local model paths are
refused.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from pathlib import Path

import httpx
import itsdangerous
import pytest
from conftest import APP_DATA_ROWS, launch_app, stop_workers, wait_until
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from test_app import tiny_settings
from test_chat_ui import make_chat_run, save_readable_model

from denselora_app.config import ConfigError, RunConfig
from denselora_app.hub import access
from denselora_app.hub.access import AccessError, Action
from denselora_app.runs import Run, resolve_run
from denselora_app.ui import forms

OWNER = "alice"
SPACE_ID = f"{OWNER}/denselora-studio"
CLIENT_SECRET = "test-oauth-client-secret"
SCOPES = "openid profile read-orgs"
MODEL = "studio-test/readable"  # a Hub id, answered from the local cache below
OWNER_ONLY = f"is for its owner, {OWNER}"
DISK_PATH = "is a path on the Space's disk"
MAX_UPLOAD_MB = 2  # the Space's upload limit in these tests (DENSELORA_MAX_UPLOAD); 1 GB by default


def session_cookie(username: str, orgs: tuple[dict, ...] = ()) -> str:
    """The session cookie gradio's OAuth callback leaves after a sign-in: the OAuth info in Starlette's session,
    signed with the key gradio derives from OAUTH_CLIENT_SECRET (gradio/oauth.py, attach_oauth)."""
    info = {"access_token": f"hf_oauth_{username}", "token_type": "bearer", "scope": SCOPES,
            "expires_at": int(time.time()) + 3600,
            "userinfo": {"sub": username, "name": username, "preferred_username": username, "picture": "",
                         "profile": f"https://huggingface.co/{username}", "orgs": list(orgs)}}
    key = hashlib.sha256(f"{CLIENT_SECRET}-v4".encode()).hexdigest()
    payload = base64.b64encode(json.dumps({"oauth_info": info}).encode())
    return itsdangerous.TimestampSigner(key).sign(payload).decode()


def cached_model(hub_cache: Path, repo_id: str) -> Path:
    """``repo_id`` in a Hugging Face cache folder, as a download leaves it: the model files in a snapshot."""
    commit = "0" * 40
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return save_readable_model(repo / "snapshots" / commit)


class Space:
    def __init__(self, app, public: str, private: str, theirs: Path, data: Path) -> None:
        self.app, self.public, self.private, self.theirs, self.data = app, public, private, theirs, data
        self.runs = app.runs

    def client(self, username: str | None) -> Client:
        headers = {"Cookie": f"session={session_cookie(username)}"} if username else None
        return Client(self.app.url, headers=headers, verbose=False)

    def files(self) -> dict[str, int]:
        """Every file and folder of the runs and presets, with its modification time: what a refusal must not
        change."""
        return {str(p): p.stat().st_mtime_ns for root in (self.runs, self.app.presets) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("space")
    hub_cache = workdir / "hub"
    cached_model(hub_cache, MODEL)
    runs = workdir / "runs"
    public, private = (make_chat_run(runs, MODEL, name) for name in ("public-chat", "private-chat"))
    resolve_run(public, runs).set_public(True)
    theirs = runs / "uploads" / "bob" / "bobs-notes-0000.jsonl"  # another user's upload
    theirs.parent.mkdir(parents=True)
    theirs.write_text(json.dumps({"text": "bob's secret notes"}) + "\n")
    data = workdir / "facts.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in APP_DATA_ROWS))
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {"SYSTEM": "spaces", "SPACE_ID": SPACE_ID, "SPACE_AUTHOR_NAME": OWNER,
                            "OAUTH_CLIENT_ID": "test-client", "OAUTH_CLIENT_SECRET": CLIENT_SECRET,
                            "OAUTH_SCOPES": SCOPES, "OPENID_PROVIDER_URL": "http://127.0.0.1:9",
                            "HF_HUB_CACHE": str(hub_cache), "DENSELORA_MAX_UPLOAD": f"{MAX_UPLOAD_MB}mb"}.items():
            patch.setenv(name, value)
        app = launch_app(workdir)
    yield Space(app, public, private, theirs, data)
    app.stop()
    stop_workers(runs)


@pytest.fixture(scope="module")
def owner(space) -> Client:
    return space.client(OWNER)


@pytest.fixture(scope="module")
def bob(space) -> Client:
    return space.client("bob")


@pytest.fixture(scope="module")
def anonymous(space) -> Client:
    return space.client(None)


# ---- who is the owner (no server) -----------------------------------------------------------------------------------


def test_the_owner_is_the_spaces_user_or_a_writing_member_of_its_organisation(monkeypatch):
    def member(role: str) -> dict:
        return {"preferred_username": "acme", "roleInOrg": role}

    monkeypatch.delenv("SPACE_ID", raising=False)
    assert access.identify(None).owner and access.identify({"preferred_username": "bob"}).owner  # your own machine
    monkeypatch.setenv("SPACE_ID", "acme/studio")
    cases = {"acme": ({"preferred_username": "ACME"}, True), "writer": ({"preferred_username": "bob",
             "orgs": [member("write")]}, True), "reader": ({"preferred_username": "bob", "orgs": [member("read")]},
             False), "other org": ({"preferred_username": "bob", "orgs": [{"preferred_username": "acme-fans"}]},
             False), "no orgs": ({"preferred_username": "bob"}, False), "signed out": (None, False)}
    assert {name: access.identify(profile).owner for name, (profile, _) in cases.items()} == \
        {name: owner for name, (_, owner) in cases.items()}
    visitor = access.identify({"preferred_username": "bob"})
    with pytest.raises(AccessError, match="Duplicate this Space"):
        access.require(visitor, Action.TRAIN)
    with pytest.raises(AccessError, match="Sign in with the Hugging Face button"):
        access.require(access.identify(None), Action.PUBLISH)


def test_presets_are_saved_beside_the_shipped_ones_never_over_them(tmp_path, monkeypatch):
    monkeypatch.delenv("DENSELORA_PRESETS", raising=False)
    monkeypatch.setenv("DENSELORA_RUNS", str(tmp_path / "runs"))
    shipped = sorted(p.name for p in forms.SHIPPED_PRESETS.glob("*.yaml"))
    assert forms.DEFAULT_PRESET in shipped
    with pytest.raises(ConfigError, match="shipped with the studio"):
        forms.save_preset(RunConfig(r=2), forms.DEFAULT_PRESET.removesuffix(".yaml"))
    assert forms.load_preset(forms.DEFAULT_PRESET).r != 2
    path = forms.save_preset(RunConfig(r=2), "mine")
    assert path == tmp_path / "runs" / "presets" / "mine.yaml"
    assert forms.list_presets() == sorted([*shipped, "mine.yaml"]) and forms.load_preset("mine.yaml").r == 2


# ---- the server ------------------------------------------------------------------------------------------------------


def owner_only_calls(space: Space) -> dict[str, tuple[tuple, dict]]:
    """One call of every endpoint that is for the owner alone, as (args, kwargs) by API name. The Evaluate and
    Publish tabs' run and adapter boxes offer a visitor nothing, so a visitor's call names none (gradio itself
    refuses a value its box does not offer; see below)."""
    settings = tiny_settings(MODEL, data="sample:studio_facts")
    adapter = str(space.runs / space.public / "adapter")
    return {
        "/start": ((), settings), "/find_lr": ((), settings), "/use_rate": ((), {}), "/stop": ((), {}),
        "/resume_run": ((space.private,), {}),
        "/delete_run": ((space.private,), {}), "/set_public": ((space.private, True), {}),
        "/upload_data": ((handle_file(str(space.data)),), {"model": MODEL}),
        "/preview_data": ((), {"model": MODEL, "data": "sample:studio_facts"}),
        "/check_model": ((), {"model": MODEL}), "/parameter_line": ((), settings),
        "/load_preset": ((forms.DEFAULT_PRESET, []), {}), "/save_preset": (("visitor preset",), settings),
        "/show_command": ((forms.DEFAULT_PRESET,), settings),
        "/evaluate": (([], None, None, "loglik", 1), {}),
        "/publish_build": ((None, f"{OWNER}/x", ""), {}),
        "/publish_model": ((None, f"{OWNER}/x", False, "", ""), {}),
        "/publish_space_build": ((None, f"{OWNER}/x-chat", f"{OWNER}/x", True, ""), {}),
        "/publish_space": ((None, f"{OWNER}/x-chat", f"{OWNER}/x", True, False, "", ""), {}),
        "/chat_base_precision": (("none", adapter), {}), "/chat_compiled": ((True, adapter), {}),
    }


OWNER_LISTS = {"/eval_adapters": [], "/publish_runs": None}  # what they list is for the owner: empty for others
# Everyone may call these; what they show a visitor is limited to the public runs (tested below), or is nothing of
# the studio's (who is signed in, Stop of one's own answer).
EVERYONE = {"/access_notice", "/restore_run", "/status", "/chat_offer", "/list_runs", "/open_run", "/compare_runs",
            "/chat_adapters", "/chat_load", "/chat", "/chat_stop", "/_check_login_status"}


def test_every_endpoint_is_decided_for(space, anonymous):
    """A new endpoint must be classified here (and call access.py) before this passes."""
    endpoints = set(anonymous.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert endpoints == set(owner_only_calls(space)) | set(OWNER_LISTS) | EVERYONE


@pytest.mark.parametrize("who", ["bob", None], ids=["signed-in visitor", "anonymous visitor"])
def test_visitors_are_refused_everything_that_writes_reads_the_server_or_spends(space, who):
    client = space.client(who)
    client.predict(api_name="/restore_run")  # the Train tab's live view: the newest run this visitor may see
    before = space.files()
    for api_name, (args, kwargs) in owner_only_calls(space).items():
        if api_name == "/upload_data":  # a visitor's file never reaches the endpoint: the upload itself is refused
            with pytest.raises(httpx.HTTPStatusError, match="403"):
                client.predict(*args, **kwargs, api_name=api_name)
            continue
        shown = json.dumps(client.predict(*args, **kwargs, api_name=api_name))
        assert OWNER_ONLY in shown, (api_name, shown[:400])
        assert ("you are signed in as bob" if who else "Sign in with the Hugging Face button") in shown, api_name
        assert "Duplicate" in shown or "duplicate this Space" in shown
    for api_name, chosen in OWNER_LISTS.items():  # empty lists, and why
        listed = client.predict(chosen, api_name=api_name)
        assert listed["choices"] == [] and OWNER_ONLY in listed["info"]
    with pytest.raises(AppError, match="not in the list of choices"):
        client.predict(space.public, f"{OWNER}/x", "", api_name="/publish_build")
    with pytest.raises(AppError, match="not in the list of choices"):
        client.predict([str(space.runs / space.public / "adapter")], None, None, "loglik", 1, api_name="/evaluate")
    assert space.files() == before, "a refused call changed nothing on disk"


@pytest.mark.slow
def test_the_owner_trains_stops_and_deletes_from_their_own_uploads(space, owner, bob):
    assert "this Space's owner: you can train" in owner.predict(api_name="/access_notice")
    _, stored, message, *_ = owner.predict(handle_file(str(space.data)), model=MODEL, cutoff_len=64,
                                           api_name="/upload_data")
    assert Path(stored).parent == space.runs / "uploads" / OWNER and not message["visible"]
    previewed = owner.predict(model=MODEL, data=stored, api_name="/preview_data")
    assert "messages" in previewed[1] and "8 rows usable" in previewed[1]

    # Paths on the server, and another user's upload, are refused everywhere the owner names data or a model.
    for path in ("/etc/passwd", "/etc/hostname.jsonl", str(space.theirs), "../../etc/passwd.csv"):
        shown = owner.predict(model=MODEL, data=path, api_name="/preview_data")
        assert DISK_PATH in shown[0]["value"] and "secret" not in json.dumps(shown), path
        started, _ = owner.predict(**tiny_settings(MODEL, data=path), api_name="/start")
        assert started.startswith("⚠️ Not started") and DISK_PATH in started
    local_model = str(next((space.app.workdir / "hub").glob("models--*/snapshots/*")))
    for api_name, kwargs in {"/start": tiny_settings(local_model, data=stored), "/check_model": {"model": local_model},
                             "/parameter_line": tiny_settings(local_model)}.items():
        assert "the base model is a Hugging Face Hub model id" in json.dumps(owner.predict(**kwargs,
                                                                                            api_name=api_name))
    assert [p.name for p in space.runs.glob("*/config.yaml")] == ["config.yaml"] * 2, "nothing was started"

    started, _ = owner.predict(**tiny_settings(MODEL, data=stored, run_name="owners-run"), api_name="/start")
    assert started.startswith("Started run"), started
    run = Run(space.runs / started.split("`")[1])
    try:
        bob.predict(api_name="/restore_run")
        assert OWNER_ONLY in bob.predict(api_name="/stop") and OWNER_ONLY in bob.predict(run.id,
                                                                                          api_name="/delete_run")
        assert run.status().active and not run.stop_requested()
        assert f"Asked run {run.id} to stop" in owner.predict(api_name="/stop") and run.stop_requested()
    finally:
        stop_workers(space.runs, timeout=10)  # the stop itself is the worker's business, tested elsewhere
    assert "Deleted" in owner.predict(run.id, api_name="/delete_run") and not run.path.exists()


def test_the_owner_saves_presets_marks_runs_public_and_builds_for_the_hub(space, owner, bob):
    message, _ = owner.predict(forms.DEFAULT_PRESET.removesuffix(".yaml"), **tiny_settings(MODEL),
                               api_name="/save_preset")
    assert "shipped with the studio" in message
    assert (forms.SHIPPED_PRESETS / forms.DEFAULT_PRESET).read_text() == \
        (space.app.presets / forms.DEFAULT_PRESET).read_text()
    message, presets = owner.predict("alice tiny run", **tiny_settings(MODEL), api_name="/save_preset")
    assert "alice-tiny-run.yaml" in message and (space.app.presets / "alice-tiny-run.yaml").is_file()
    assert forms.DEFAULT_PRESET in [choice[0] for choice in presets["choices"]]

    private_adapter = str(space.runs / space.private / "adapter")
    assert private_adapter not in json.dumps(bob.predict(api_name="/chat_adapters"))
    assert "is public" in owner.predict(space.private, True, api_name="/set_public")
    assert private_adapter in json.dumps(bob.predict(api_name="/chat_adapters"))
    assert "private again" in owner.predict(space.private, False, api_name="/set_public")
    assert not resolve_run(space.private, space.runs).is_public()

    assert space.public in json.dumps(owner.predict(None, api_name="/publish_runs"))  # the box offers the runs
    built = owner.predict(space.public, f"{OWNER}/tiny-chat", "", api_name="/publish_build")
    assert "Built the repository" in built[0]
    pushed = owner.predict(space.public, f"{OWNER}/tiny-chat", False, "", "", api_name="/publish_model")
    assert OWNER_ONLY not in pushed  # offline it fails further on, at the Hub itself


def test_visitors_see_and_chat_with_the_public_runs_only(space, bob, anonymous):
    public_adapter = str(space.runs / space.public / "adapter")
    assert "Signed in as **bob**. This Space belongs to **alice**" in bob.predict(api_name="/access_notice")
    assert "**sign in** if that is you" in anonymous.predict(api_name="/access_notice")
    for client in (bob, anonymous):
        table, _, _ = client.predict(api_name="/list_runs")
        assert [row[0] for row in table["data"]] == [space.public]
        # A private run and one that does not exist get the same answer, and no answer names a server path.
        private, missing = (client.predict(ref, api_name="/open_run")[0] for ref in (space.private, "no-such-run"))
        assert private == missing and "not one of this Space's public runs" in private
        shown = client.predict(space.public, api_name="/open_run")[0]
        assert space.public in shown and str(space.app.workdir) not in shown + private
        adapters, _, _ = client.predict(api_name="/chat_adapters")
        assert [choice[1] for choice in adapters["choices"]] == [public_adapter]
        for adapter in (space.private, str(space.runs / space.private / "adapter"), "/etc", "someone/adapter"):
            refused = client.predict(adapter, api_name="/chat_load")
            assert refused.startswith("⚠️") and "made public" in refused, adapter

    *_, status = bob.predict("what is the capital of a country?", [], [], public_adapter, False, "", 0.0, 1.0, 8, 0,
                             api_name="/chat")
    assert "Last answer: 8 tokens" in status and "stopped" not in status


@pytest.mark.slow
def test_one_visitors_stop_leaves_another_visitors_answer_running(space, bob, anonymous):
    adapter = str(space.runs / space.public / "adapter")
    tokens = 300  # long enough to be still generating when the other Stop arrives (a few seconds)

    def ask(client: Client):
        job = client.submit("what is the capital of a country?", [], [], adapter, False, "", 0.0, 1.0, tokens, 0,
                            api_name="/chat")
        wait_until(lambda: len(job.outputs()) >= 3, timeout=120, interval=0.02, what="the answer to stream")
        return job

    job = ask(bob)
    anonymous.predict(api_name="/chat_stop")
    assert not job.done(), "bob's answer ended before the other visitor's Stop: make the answer longer"
    *_, status = job.result()
    assert f"Last answer: {tokens} tokens" in status and "stopped" not in status

    job = ask(bob)
    bob.predict(api_name="/chat_stop")
    *_, status = job.result()
    assert "stopped" in status


@pytest.mark.slow
def test_a_five_megabyte_message_is_refused_at_once_while_another_visitor_is_answered(space, bob, anonymous):
    adapter = str(space.runs / space.public / "adapter")
    huge = "word " * 1_000_000

    def ask_huge() -> str:
        *_, refused = anonymous.predict(huge, [], [], adapter, False, "", 0.0, 1.0, 8, 0, api_name="/chat")
        return refused

    ask_huge()  # the adapter is loaded now: what follows times the refusal alone
    started = time.monotonic()
    assert "5,000,000 characters long, more than the model's context" in ask_huge()
    assert time.monotonic() - started < 1.5, "a 5 MB message must be refused without being tokenized"
    # Meanwhile another visitor is answered as usual (the chat answers one request at a time, so the refusal
    # waits its turn behind an answer under way, then costs nothing).
    answer = bob.submit("what is the capital of a country?", [], [], adapter, False, "", 0.0, 1.0, 24, 0,
                        api_name="/chat")
    assert "more than the model's context" in ask_huge()
    *_, status = answer.result(timeout=120)
    assert "Last answer: 24 tokens" in status


@pytest.mark.parametrize("who", ["bob", None], ids=["signed-in visitor", "anonymous visitor"])
def test_a_visitor_cannot_upload_at_all(space, who):
    """gradio's upload route takes files from the owner only: a visitor can neither fill the Space's disk nor learn a
    path of the server from the answer."""
    cookies = {"session": session_cookie(who)} if who else None
    uploads = space.app.upload_folder
    before = sorted(uploads.rglob("*")) if uploads.exists() else []
    answer = httpx.post(f"{space.app.url}gradio_api/upload", files={"files": ("notes.txt", b"x" * 1000)},
                        cookies=cookies)
    assert answer.status_code == 403 and OWNER_ONLY in answer.json()["detail"]
    assert str(space.app.workdir) not in answer.text and "/tmp" not in answer.text
    assert (sorted(uploads.rglob("*")) if uploads.exists() else []) == before


def test_a_two_gigabyte_upload_from_a_visitor_is_refused_and_nothing_is_kept(space):
    """The refusal comes from the headers, before any of the body goes to disk."""
    boundary = "denselora-test"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="big.jsonl"\r\n\r\n'.encode()

    def body():
        yield head
        block = b"x" * 2**20
        for _ in range(2048):
            yield block

    uploads = space.app.upload_folder
    before = sorted(uploads.rglob("*")) if uploads.exists() else []
    started = time.monotonic()
    answer = httpx.post(f"{space.app.url}gradio_api/upload", content=body(), timeout=60,
                        headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert answer.status_code == 403 and OWNER_ONLY in answer.json()["detail"]
    assert time.monotonic() - started < 30
    assert (sorted(uploads.rglob("*")) if uploads.exists() else []) == before


def test_an_upload_over_the_limit_is_refused_as_it_arrives(space):
    """Even the owner's upload stops at the Space's limit (DENSELORA_MAX_UPLOAD): the body is refused once it passes
    the limit, and the file is not kept."""
    cookies = {"session": session_cookie(OWNER)}
    small = httpx.post(f"{space.app.url}gradio_api/upload", files={"files": ("ok.jsonl", b"{}\n" * 1000)},
                       cookies=cookies)
    assert small.status_code == 200
    big = httpx.post(f"{space.app.url}gradio_api/upload",
                     files={"files": ("big.jsonl", b"x" * (MAX_UPLOAD_MB + 1) * 1024 * 1024)}, cookies=cookies)
    assert big.status_code == 413 and "maximum allowed size" in big.text


@pytest.mark.slow
def test_no_endpoint_takes_a_file_that_was_not_uploaded(space, owner):
    """Files named in a request's data, not uploaded: gradio refuses them before the studio sees them."""
    cookie = {"session": session_cookie(OWNER)}
    before = space.files()
    for path in ("/etc/passwd", str(space.theirs)):
        for value in ({"path": path, "meta": {"_type": "gradio.FileData"}}, {"path": path}, path):
            for api_name, data in (("upload_data", [value, MODEL, False, "", "auto", 64, False]),
                                   ("evaluate", [[str(space.runs / space.public / "adapter")], value, None,
                                                 "loglik", 1])):
                call = httpx.post(f"{space.app.url}gradio_api/call/{api_name}", json={"data": data}, cookies=cookie)
                events = httpx.get(f"{space.app.url}gradio_api/call/{api_name}/{call.json()['event_id']}",
                                   cookies=cookie, timeout=60).text
                assert events.startswith("event: error") and "secret" not in events, (api_name, value, events)
    assert space.files() == before


def test_a_visitor_reads_logs_without_the_servers_folders_and_with_every_other_path_intact(monkeypatch, tmp_path):
    runs = tmp_path / "runs"
    monkeypatch.setenv("DENSELORA_RUNS", str(runs))
    visitor = access.Caller(None, owner=False)
    text = f"Adapter saved to {runs}/r1/adapter; data {tmp_path}/runs-old/x.jsonl; see /usr/lib/python3"
    assert access.shown_to(visitor, text) == (
        f"Adapter saved to runs/r1/adapter; data {tmp_path}/runs-old/x.jsonl; see /usr/lib/python3")
    monkeypatch.chdir("/")  # a server started at the root: "/" is no folder to hide
    assert access.shown_to(visitor, "see /usr/lib/python3") == "see /usr/lib/python3"
    assert access.shown_to(access.Caller("alice", owner=True), text) == text
