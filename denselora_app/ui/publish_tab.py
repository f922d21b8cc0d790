"""The Publish tab: build a run's model repository (adapter, tokenizer, loss curve, model card), preview it,
download it as a zip, push it to the Hugging Face Hub; and the same for a demo chat Space.

The token is never kept: each push takes it from the signed-in user (gr.OAuthToken, on a Space) or, elsewhere, from
HF_TOKEN or the cached login (publish.resolve_token), passes it to the engine and forgets it. It is not in gr.State,
on disk, or in anything shown.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from denselora_app.config import ConfigError, StudioError
from denselora_app.hub import cards, publish
from denselora_app.hub.access import Action
from denselora_app.hub.account import PublishError
from denselora_app.hub.hosting import on_space
from denselora_app.hub.publish import RepoFolder
from denselora_app.rules import PUBLISH_FORMS
from denselora_app.runs import list_runs, resolve_run
from denselora_app.ui.messages import refusal, warn

# The card's loss-curve image is a file of the repository, which the page cannot load: it is shown beside the card.
_CURVE_LINK = re.compile(r"!\[[^\]]*\]\(" + re.escape(cards.LOSS_CURVE) + r"\)\n?")
_FRONT_MATTER = re.compile(r"\A---\n(.*?)\n---\n", re.S)


def publishable_runs() -> list[str]:
    """Ids of the runs that hold a final adapter, newest first."""
    return [run.id for run in list_runs() if run.has_adapter()]


def refresh_runs(chosen: str | None, profile: gr.OAuthProfile | None = None) -> Any:
    """The runs with a final adapter, keeping the one chosen if it still has one; otherwise the newest is chosen.
    A caller who may not publish gets none, and the reason."""
    if refused := refusal(profile, Action.PUBLISH):
        return gr.Dropdown(choices=[], value=None, info=refused)
    ids = publishable_runs()
    return gr.Dropdown(choices=ids, value=chosen if chosen in ids else (ids[0] if ids else None))


def _missing(run_id: str | None, repo_id: str, what: str = "model repository") -> str | None:
    """What to fill in first, if anything."""
    if not run_id:
        return warn("Choose a run first.")
    if not repo_id.strip():
        return warn(f"Give the {what} id, as NAMESPACE/NAME (your user name or an organization).")
    return None


def _token(oauth_token: gr.OAuthToken | None) -> str | None:
    return oauth_token.token if oauth_token is not None else None


def _zip(folder: RepoFolder) -> Path:
    """The folder zipped into the temp dir, where the page may download it from wherever the runs folder is. One
    file per repository, replaced by the next build of it."""
    target = Path(tempfile.gettempdir()) / "denselora-studio-exports"
    target.mkdir(exist_ok=True)
    name = f"{folder.repo_type}-{folder.repo_id.replace('/', '--')}.zip"
    return publish.zip_folder(folder, target / name)


def _file_list(folder: RepoFolder) -> str:
    lines = [f"- `{name}` ({(folder.path / name).stat().st_size / 1024:,.1f} kB)" for name in folder.files]
    return f"**{len(folder.files)} files** for `{folder.repo_id}`:\n\n" + "\n".join(lines)


def _card_preview(folder: RepoFolder) -> str:
    """README.md as the page can show it: the metadata as YAML, then the card without the loss-curve link."""
    text = (folder.path / "README.md").read_text(encoding="utf-8")
    if match := _FRONT_MATTER.match(text):
        text = f"```yaml\n{match[1]}\n```\n\n{text[match.end():]}"
    return _CURVE_LINK.sub("", text)


def _loss_curve(folder: RepoFolder) -> Any:
    path = folder.path / cards.LOSS_CURVE
    if not path.exists():
        return None
    from PIL import Image  # handed over as an image, not a path: the runs folder may be outside gradio's reach

    with Image.open(path) as image:
        return image.copy()


def _download(zip_path: Path) -> Any:
    return gr.DownloadButton(f"Download {zip_path.name}", value=str(zip_path), visible=True)


def build_model(run_id: str | None, repo_id: str, base_model: str, profile: gr.OAuthProfile | None = None,
                form: str = PUBLISH_FORMS[0], calibration: str = "") -> tuple[Any, ...]:
    """Build the model repository (the adapter, or the export ``form`` of it): the message, the card preview, the
    file list, the loss curve, the zip."""
    nothing = ("", "", None, gr.DownloadButton(visible=False))
    if problem := refusal(profile, Action.PUBLISH) or _missing(run_id, repo_id):
        return problem, *nothing
    try:
        if form != PUBLISH_FORMS[0]:
            from denselora_app.export.publishing import build_export_repo

            folder = build_export_repo(resolve_run(run_id), form, repo_id.strip(),
                                       base_model=base_model.strip() or None, calibration=calibration.strip() or None)
        else:
            folder = publish.build_model_repo(run_id, repo_id.strip(), base_model=base_model.strip() or None)
    except StudioError as err:
        return warn(err), *nothing
    zip_path = _zip(folder)
    return (f"Built the repository in `{folder.path}`: this is exactly what **Publish to the Hub** uploads.",
            _card_preview(folder), _file_list(folder), _loss_curve(folder), _download(zip_path))


def push_model(run_id: str | None, repo_id: str, private: bool, commit_message: str, base_model: str,
               oauth_token: gr.OAuthToken | None, profile: gr.OAuthProfile | None = None,
               form: str = PUBLISH_FORMS[0], calibration: str = "") -> str:
    """Build the model repository (the adapter, or the export ``form`` of it) and upload it (creating the repository
    if needed)."""
    if problem := refusal(profile, Action.PUBLISH) or _missing(run_id, repo_id):
        return problem
    if form != PUBLISH_FORMS[0]:
        from denselora_app.export.publishing import publish_export

        try:
            return "✅ " + publish_export(resolve_run(run_id), form, repo_id.strip(), private=private,
                                         commit_message=commit_message.strip() or None, token=_token(oauth_token),
                                         base_model=base_model.strip() or None, calibration=calibration.strip() or None)
        except StudioError as err:
            return warn(err)
    try:
        result = publish.publish_model(run_id, repo_id.strip(), private=private,
                                       commit_message=commit_message.strip() or None, token=_token(oauth_token),
                                       base_model=base_model.strip() or None)
    except (PublishError, ConfigError) as err:
        return warn(err)
    return _published(result)


def build_space(run_id: str | None, space_id: str, repo_id: str, bundle_adapter: bool,
                base_model: str, profile: gr.OAuthProfile | None = None) -> tuple[Any, ...]:
    """Build the demo Space: the message, its file list and its zip."""
    nothing = (gr.DownloadButton(visible=False),)
    if problem := refusal(profile, Action.PUBLISH) or _missing(run_id, space_id, "Space"):
        return problem, *nothing
    try:
        folder = publish.build_space_repo(run_id, space_id.strip(), adapter_repo_id=repo_id.strip() or None,
                                          bundle_adapter=bundle_adapter, base_model=base_model.strip() or None)
    except (PublishError, ConfigError) as err:
        return warn(err), *nothing
    where = ("carries the adapter in `adapter/`" if "adapter/adapter_config.json" in folder.files
             else f"loads the adapter from `{repo_id.strip()}`")
    return (f"Built the Space in `{folder.path}`; it {where}.\n\n{_file_list(folder)}", _download(_zip(folder)))


def push_space(run_id: str | None, space_id: str, repo_id: str, bundle_adapter: bool, private: bool,
               commit_message: str, base_model: str, oauth_token: gr.OAuthToken | None,
               profile: gr.OAuthProfile | None = None) -> str:
    """Build the demo Space and upload it as a Gradio Space."""
    if problem := refusal(profile, Action.PUBLISH) or _missing(run_id, space_id, "Space"):
        return problem
    try:
        result = publish.publish_space(run_id, space_id.strip(), adapter_repo_id=repo_id.strip() or None,
                                       bundle_adapter=bundle_adapter, private=private,
                                       commit_message=commit_message.strip() or None, token=_token(oauth_token),
                                       base_model=base_model.strip() or None)
    except (PublishError, ConfigError) as err:
        return warn(err)
    return _published(result)


def _published(result: publish.PublishResult) -> str:
    commit = f" ([commit]({result.commit_url}))" if result.commit_url else ""
    return f"✅ {result.message} as {result.user}{commit}: [{result.url}]({result.url})"


@dataclass
class PublishTab:
    refresh_inputs: list[Any]
    refresh_outputs: list[Any]


def build(demo: gr.Blocks) -> PublishTab:
    """The Publish tab's components and events; call inside ``demo``'s context (and a gr.Tab)."""
    if on_space():
        gr.Markdown("Publishing is for this Space's owner, signed in (the button at the top of the page): it "
                    "publishes with **your** sign-in; the Space's own token is never used.")
    else:
        gr.Markdown("Publishing uses the token in `HF_TOKEN`, or the login of `hf auth login` on the machine that "
                    "runs this app. It needs write access.")
    with gr.Row(equal_height=False):
        run = gr.Dropdown([], label="Run", info="Runs with a final adapter", scale=5, elem_id="publish-run")
        with gr.Column(scale=1, min_width=140):
            refresh_button = gr.Button("Refresh list", size="sm", elem_id="publish-refresh")
    with gr.Row():
        repo_id = gr.Textbox(label="Model repository id", placeholder="your-name/my-denselora-adapter",
                             elem_id="publish-repo-id")
        base_model = gr.Textbox(label="Base model Hub id", placeholder="e.g. HuggingFaceTB/SmolLM2-135M-Instruct",
                                info="Needed when the run trained on a local model folder",
                                elem_id="publish-base-model")
    with gr.Row():
        commit_message = gr.Textbox(label="Commit message", placeholder="Optional", elem_id="publish-commit")
        private = gr.Checkbox(False, label="Private", info="Applies when the repository is created",
                              elem_id="publish-private")
    with gr.Row():
        form = gr.Radio(list(PUBLISH_FORMS), value=PUBLISH_FORMS[0], label="Publish as",
                        info="denselora: the adapter itself (needs DenseLoRA to load). lora / merged / gguf: an export "
                             "that loads anywhere (PEFT, vLLM, llama.cpp, Ollama); exact for activation identity",
                        elem_id="publish-form")
        calibration = gr.Textbox("", label="Calibration data (GELU/SiLU adapters)", placeholder="e.g. data/train.jsonl",
                                 info="Rows to fit the export on and measure its fidelity; required unless the "
                                      "adapter used activation identity", elem_id="publish-calibration")
    with gr.Row():
        build_button = gr.Button("Build / preview", elem_id="publish-build")
        download = gr.DownloadButton("Download zip", visible=False, elem_id="publish-download")
        push_button = gr.Button("Publish to the Hub", variant="primary", elem_id="publish-push")
    message = gr.Markdown(elem_id="publish-message")
    with gr.Row(equal_height=False):
        card = gr.Markdown(container=True, max_height=640, elem_id="publish-card")
        with gr.Column():
            files = gr.Markdown(elem_id="publish-files")
            curve = gr.Image(label=cards.LOSS_CURVE, type="pil", interactive=False, elem_id="publish-curve")

    gr.Markdown("### Demo Space\nA Gradio chat app for the adapter, with a side-by-side comparison to its base.")
    with gr.Row():
        space_id = gr.Textbox(label="Space id", placeholder="your-name/my-adapter-chat", elem_id="publish-space-id")
        bundle = gr.Checkbox(False, label="Carry the adapter in the Space",
                             info="Needed when the model repository is private or not published",
                             elem_id="publish-bundle")
    with gr.Row():
        space_build_button = gr.Button("Build Space", elem_id="publish-space-build")
        space_download = gr.DownloadButton("Download Space zip", visible=False, elem_id="publish-space-download")
        space_push_button = gr.Button("Create demo Space", variant="primary", elem_id="publish-space-push")
    space_message = gr.Markdown(elem_id="publish-space-message")

    refresh_button.click(refresh_runs, inputs=[run], outputs=[run], api_name="publish_runs")
    build_button.click(build_model, inputs=[run, repo_id, base_model, form, calibration],
                       outputs=[message, card, files, curve, download], api_name="publish_build")
    push_button.click(push_model, inputs=[run, repo_id, private, commit_message, base_model, form, calibration],
                      outputs=[message],
                      api_name="publish_model")
    space_build_button.click(build_space, inputs=[run, space_id, repo_id, bundle, base_model],
                             outputs=[space_message, space_download], api_name="publish_space_build")
    space_push_button.click(push_space, inputs=[run, space_id, repo_id, bundle, private, commit_message, base_model],
                            outputs=[space_message], api_name="publish_space")
    return PublishTab(refresh_inputs=[run], refresh_outputs=[run])
