"""Upload an exported model folder to the Hugging Face Hub, keeping the local copy whatever happens.

The upload goes through ``huggingface_hub.HfApi`` (``create_repo`` then ``upload_folder``), which reads
the folder and never writes to it. Everything that can be checked locally is checked before the first
request, and a network or authentication failure becomes a :class:`HubUploadError` that says the
folder is intact and how to retry.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from huggingface_hub import HfApi

__all__ = ["HubUploadError", "push_to_hub"]


class HubUploadError(RuntimeError):
    """The upload failed on the network or the Hub side; the local folder was left as it was."""


def push_to_hub(
    output_dir: str | os.PathLike[str],
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload quantized model (lightning-quant)",
    api: HfApi | None = None,
    revision: str | None = None,
) -> str:
    """Create ``repo_id`` if needed and upload every file of the exported folder ``output_dir``.

    The folder is only read: on any failure it stays as it was, and calling ``push_to_hub`` again
    uploads it (files the Hub already holds unchanged are skipped by ``huggingface_hub``).

    Args:
        output_dir: Folder written by the export (``config.json``, weights, ``README.md``, tokenizer).
        repo_id: ``"namespace/name"`` on the Hub.
        private: Create the repo private (ignored when the repo already exists).
        token: Hub token with write access; ``None`` uses the locally saved one (``hf auth login``).
        commit_message: Summary of the commit.
        api: The ``HfApi`` to use, e.g. ``HfApi(endpoint=...)`` for a private Hub; a default one otherwise.
        revision: Branch to commit to; created from the default branch when it does not exist.

    Returns:
        The URL of the created commit.

    Raises:
        ValueError: if ``output_dir`` does not look like an export or ``repo_id`` is malformed
            (checked before any request).
        HubUploadError: if the Hub cannot be reached or refuses the request (401/403/404, ...).

    Example:
        >>> push_to_hub("exports/bert-nf4", "me/bert-nf4", private=True)  # doctest: +SKIP
        'https://huggingface.co/me/bert-nf4/commit/...'
    """
    folder = Path(output_dir)
    _check_export_folder(folder)
    from huggingface_hub.utils import validate_repo_id

    validate_repo_id(repo_id)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()

    try:
        api.create_repo(repo_id, private=private, exist_ok=True, token=token)
        if revision is not None and not revision.startswith("refs/pr/"):
            api.create_branch(repo_id, branch=revision, exist_ok=True, token=token)
        info = api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            commit_message=commit_message,
            token=token,
            revision=revision,
        )
    except _network_errors() as err:
        raise HubUploadError(_failure_message(err, repo_id, folder, getattr(api, "endpoint", None))) from err
    return str(getattr(info, "commit_url", info))


def _check_export_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise ValueError(
            f"`output_dir` {str(folder)!r} is not a folder; export the model first "
            "(`model.save_pretrained(output_dir)` or `lightning-quant export`)"
        )
    if not (folder / "config.json").is_file():
        raise ValueError(
            f"`output_dir` {str(folder)!r} has no `config.json`; save the model with "
            "`model.save_pretrained(output_dir)` before pushing"
        )
    weights = [*folder.glob("*.safetensors"), *folder.glob("pytorch_model*.bin")]
    if not any(path.is_file() for path in weights):
        raise ValueError(
            f"`output_dir` {str(folder)!r} has no weights (`*.safetensors` or `pytorch_model.bin`); save the "
            "model with `model.save_pretrained(output_dir)` before pushing"
        )
    if not (folder / "README.md").is_file():
        raise ValueError(
            f"`output_dir` {str(folder)!r} has no `README.md`; write the model card with "
            "`render_model_card(...)` to `README.md` before pushing"
        )


def _network_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the Hub could not be reached or refused us", whatever HTTP client is used."""
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

    errors: list[type[BaseException]] = [
        HfHubHTTPError,
        OfflineModeIsEnabled,
        LocalTokenNotFoundError,
        ConnectionError,
        TimeoutError,
    ]
    # huggingface_hub moved from requests to httpx (and the httpx2 fork); accept whichever is installed.
    for module, name in (("httpx2", "HTTPError"), ("httpx", "HTTPError"), ("requests", "RequestException")):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def _failure_message(err: BaseException, repo_id: str, folder: Path, endpoint: str | None) -> str:
    return (
        f"Upload of {str(folder)!r} to the Hub repo {repo_id!r} failed: {_cause(err, endpoint)}\n"
        f"The local folder at {folder} is untouched. Fix the cause, then retry with "
        f"`push_to_hub({str(folder)!r}, {repo_id!r})` again, or with the CLI: "
        f"`hf upload {repo_id} {folder}` (`huggingface-cli upload {repo_id} {folder}` on older versions)."
    )


def _cause(err: BaseException, endpoint: str | None) -> str:
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalTokenNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if isinstance(err, HfHubHTTPError):
        status = _status_code(err)
        if isinstance(err, RepositoryNotFoundError):
            return (
                f"the repository was not found or is not writable with this token (HTTP {status}); check "
                "`repo_id` and that the token has write access to its namespace."
            )
        if status in (401, 403):
            return (
                f"authentication failed (HTTP {status}: {first_line}); log in with `hf auth login` or pass "
                "`token=` a token with write access."
            )
        return f"the Hub answered HTTP {status}: {first_line}"
    if isinstance(err, OfflineModeIsEnabled):
        return "offline mode is enabled (`HF_HUB_OFFLINE=1`); unset it to upload."
    if isinstance(err, LocalTokenNotFoundError):
        return "no Hub token found; log in with `hf auth login` or pass `token=`."
    where = endpoint or "the Hub"
    return f"could not reach {where} ({type(err).__name__}: {first_line})."


def _status_code(err: Any) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)
