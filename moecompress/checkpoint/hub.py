"""Model arguments that name a Hugging Face Hub repository instead of a folder.

``Qwen/Qwen3-30B-A3B`` (or ``Qwen/Qwen3-30B-A3B@<branch, tag or commit>``), given where a checkpoint folder is
expected and no such folder exists here, is fetched into the Hub's cache (``HF_HUB_CACHE``, once; a later
run reads the cached snapshot) and read from there like any folder. Only what the tools read is fetched:
safetensors shards, JSON configs and tokenizer files -- never pickled weights (``*.bin``, ``*.pt``) and never
code (``*.py``: remote code is not run), and nothing from subfolders. ``HF_HUB_OFFLINE=1`` uses the cache
alone (online, huggingface_hub asks the Hub for the revision first, even for a cached model); gated models take
the token of ``hf auth login`` or ``HF_TOKEN``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from ..errors import UserError, one_line

log = logging.getLogger("moecompress")

# owner/name[@revision], as the Hub spells repository ids; "./x", "/x", "~/x" and "a/b/c" are paths
_REPO = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<rev>[\w./-]+))?")
# what the tools read: weights (safetensors only), configs, tokenizers, chat templates, generation settings
CHECKPOINT_FILES = ["*.safetensors", "*.safetensors.index.json", "*.json", "tokenizer*", "*.model", "*.tiktoken",
                    "merges.txt", "vocab.txt", "*.jinja"]
CONFIG_FILES = ["config.json"]


def is_repo_id(arg: str) -> bool:
    """``owner/name[@rev]`` with neither it nor ``owner`` a path here (``models/typo`` in a folder that has
    ``models/`` is a mistyped path, not a repository)."""
    m = _REPO.fullmatch(str(arg))
    return m is not None and not Path(str(arg)).exists() and not Path(m.group("repo").split("/")[0]).exists()


def local_model(arg: str | None, *, config_only: bool = False, out=None, overwrite: bool = False,
                resume: bool = False) -> str | None:
    """``arg`` itself when it is a path (existing or not: the commands then say what is wrong with it), else
    the local snapshot folder of the Hub repository it names, fetched if needed (``config_only``: just its
    config.json, for commands that read the shapes alone). For a command that writes ``out`` (not resuming),
    the checks of ``out`` that need no source come first, so they do not wait for a long download."""
    if arg is not None and not str(arg).strip():  # ('' would read as the current folder)
        raise UserError("the model path is empty; give a checkpoint folder or a Hub repository id (owner/name)")
    if arg is None or not is_repo_id(arg):
        return arg
    if out is not None and not resume:
        from .writer import check_output_path

        check_output_path(None, Path(out), overwrite)
    m = _REPO.fullmatch(str(arg))
    repo, rev = m.group("repo"), m.group("rev")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub import errors as hub_errors
    except ImportError:  # pragma: no cover - a dependency of transformers
        raise UserError(f"{arg} is not a folder here, and huggingface_hub (to fetch it from the Hub) is not "
                        "installed") from None
    patterns = CONFIG_FILES if config_only else CHECKPOINT_FILES
    log.info("%s is not a folder here: reading the Hugging Face Hub repository %s%s (%s; no pickles, no code)",
             arg, repo, f" at {rev}" if rev else "", "its config.json" if config_only else
             "safetensors, configs, tokenizer")
    where = f"{arg} is not a folder here, and as a Hub repository"
    def fetch(**kw) -> Path:  # top-level files only (fnmatch's * crosses "/": original/*.safetensors would come)
        return Path(snapshot_download(repo, revision=rev, allow_patterns=patterns, ignore_patterns=["*/*"], **kw))

    try:
        path = _fetch_or_cached(fetch, arg, hub_errors)
    except getattr(hub_errors, "GatedRepoError", ()) as e:  # before RepositoryNotFoundError, its parent
        raise UserError(f"{where} it is gated: accept its terms on the Hub and log in (hf auth login, or "
                        f"HF_TOKEN) ({one_line(e, 160)})") from None
    except getattr(hub_errors, "RepositoryNotFoundError", ()):
        raise UserError(f"{where} it does not exist (or is private: log in with hf auth login, or set "
                        "HF_TOKEN)") from None
    except getattr(hub_errors, "RevisionNotFoundError", ()):
        raise UserError(f"{where} it has no revision {rev!r}") from None
    except (getattr(hub_errors, "LocalEntryNotFoundError", ()), getattr(hub_errors, "OfflineModeIsEnabled", ())):
        raise UserError(f"{where} it is not in the Hub cache and cannot be fetched now (offline, or the Hub is "
                        "unreachable); give a local folder, or fetch it once with a connection") from None
    except Exception as e:  # HTTP, proxy and transfer errors of huggingface_hub's client, whatever its version
        raise UserError(f"{where} it could not be fetched: {type(e).__name__}: {one_line(e, 200)}") from None
    if not (path / "config.json").is_file():
        raise UserError(f"the Hub repository {repo} has no config.json: not a Hugging Face model checkpoint")
    if not config_only and not any(path.glob("*.safetensors")):
        raise UserError(f"the Hub repository {repo} has no safetensors weights (pickled weights are not read); "
                        "convert them to safetensors first")
    return str(path)


def _fetch_or_cached(fetch, arg: str, hub_errors) -> Path:
    """``fetch()``; where the Hub cannot be asked (offline, unreachable), the cached snapshot if there is one
    (huggingface_hub 1.x does not fall back to it by itself for a commit revision), else the first error."""
    answers = tuple(getattr(hub_errors, n) for n in ("RepositoryNotFoundError", "RevisionNotFoundError")
                    if hasattr(hub_errors, n))  # the Hub's answer (gated too): not for the cache to overrule
    try:
        return fetch()
    except answers:
        raise
    except Exception as first:
        try:
            path = fetch(local_files_only=True)
        except Exception:
            raise first from None
        log.info("the Hub could not be asked about %s: reading its cached snapshot %s", arg, path)
        return path
