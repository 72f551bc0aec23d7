"""`--push_to_hub REPO_ID`: huggingface_hub's upload of the whole verified folder, only after every check passed."""

from __future__ import annotations

from pathlib import Path

from ..config import RecipeError


def check_repo_id(repo_id: str) -> None:
    """A repo id the Hub accepts (`user/name`), said before any work."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise RecipeError(
            f"--push_to_hub: {repo_id!r} is not a Hub repo id ({str(error).splitlines()[0]}); use user/name."
        ) from None


def push(folder: Path, repo_id: str, private: bool = False) -> str:
    """Create `repo_id` if needed and upload `folder`; one line when the Hub cannot be reached (nothing sent)."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(
            folder_path=str(folder), repo_id=repo_id, commit_message="jetmoe-ft export"
        )
    except Exception as error:  # offline, no token, no permission, network: all end the same way
        reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise RecipeError(
            f"--push_to_hub: could not upload to {repo_id} ({type(error).__name__}: {reason}); nothing was sent. The "
            f"verified export is in {folder}: upload it later with `hf upload {repo_id} {folder}`."
        ) from None
    return str(getattr(commit, "commit_url", commit))
