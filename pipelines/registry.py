"""The MLflow Model Registry: versions, aliases, evidence, and safe concurrent promotion.

Aliases: `challenger` (the newest registered candidate), `champion` (what serves),
`previous-champion` (where `llmops rollback` goes back to).

Every call goes through `call()`, which retries transient failures (connection errors,
HTTP 5xx, 429) with exponential backoff (tenacity) and turns a server that stays down into
one clear `RegistryUnavailable` error. Promotions hold a registry-wide lock: MLflow has no
compare-and-set on aliases, so the lock is a registered model `<name>--promotion-lock`
whose creation is atomic in MLflow's database (a unique name); it works the same for the
embedded SQLite store and for a shared tracking server.
"""

from __future__ import annotations

import contextlib
import getpass
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from pipelines.errors import LLMOpsError
from pipelines.params import Params

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

    from pipelines.lm import CausalLM

logger = logging.getLogger(__name__)

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous-champion"
T = TypeVar("T")


class RegistryUnavailable(LLMOpsError):
    """The tracking server / registry cannot be reached."""


class RegistryBusy(LLMOpsError):
    """Another promotion holds the registry lock for too long."""


class RegistryError(LLMOpsError):
    """The registry refused a request (invalid name, unknown version, ...)."""


def _is_transient(error: BaseException) -> bool:
    from mlflow.exceptions import MlflowException
    from requests.exceptions import ConnectionError as RequestsConnectionError
    from requests.exceptions import Timeout

    if isinstance(error, (RequestsConnectionError, Timeout, ConnectionError)):
        return True
    if isinstance(error, MlflowException):
        text = str(error)
        return (error.error_code in {"TEMPORARILY_UNAVAILABLE", "INTERNAL_ERROR", "REQUEST_LIMIT_EXCEEDED"}
                or "Max retries exceeded" in text or "Connection refused" in text
                or "API request to" in text and "failed" in text)
    return False


class Registry:
    """A thin, retrying view of MLflow's client for one registered model."""

    def __init__(self, params: Params) -> None:
        from mlflow import MlflowClient

        from pipelines.tracking import client_environment, tracking_uri

        client_environment()
        self.params = params
        self.settings = params.registry
        self.name = params.registry.model_name
        self.uri = tracking_uri(params.tracking)
        self.client: MlflowClient = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    # --- plumbing -------------------------------------------------------------------------

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a client call; retry transient errors; fail clearly when the server stays down."""
        from mlflow.exceptions import MlflowException
        from tenacity import retry, retry_if_exception, stop_after_attempt, wait_exponential

        retrying = retry(
            retry=retry_if_exception(_is_transient),
            stop=stop_after_attempt(self.settings.retries),
            wait=wait_exponential(multiplier=self.settings.retry_wait_seconds, max=30),
            before_sleep=lambda state: logger.warning("registry call failed (%s); retrying",
                                                      str(state.outcome.exception()).splitlines()[0][:200]),
            reraise=True,
        )
        try:
            return retrying(fn)(*args, **kwargs)
        except MlflowException as error:
            if _is_transient(error):
                raise RegistryUnavailable(
                    f"the MLflow registry at {self.uri} is unreachable after {self.settings.retries} attempts "
                    f"({str(error).splitlines()[0][:200]}); start the tracking server or fix tracking.uri / "
                    "MLFLOW_TRACKING_URI"
                ) from None
            raise RegistryError(f"MLflow registry refused the request: {str(error).splitlines()[0][:300]}") from None
        except OSError as error:
            raise RegistryUnavailable(f"the MLflow registry at {self.uri} is unreachable: {error}") from None

    def check_reachable(self) -> None:
        self.call(self.client.search_experiments, max_results=1)

    # --- reads ----------------------------------------------------------------------------

    def version(self, version: str | int) -> ModelVersion:
        return self.call(self.client.get_model_version, self.name, str(version))

    def alias(self, alias: str) -> ModelVersion | None:
        """The version an alias points at, or None (also when the model is not registered yet)."""
        from mlflow.exceptions import MlflowException

        def lookup() -> ModelVersion | None:
            try:
                return self.client.get_model_version_by_alias(self.name, alias)
            except MlflowException as error:
                if error.error_code in {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"}:
                    return None
                raise

        return self.call(lookup)

    # --- writes ---------------------------------------------------------------------------

    def set_alias(self, alias: str, version: str | int) -> None:
        self.call(self.client.set_registered_model_alias, self.name, alias, str(version))

    def delete_alias(self, alias: str) -> None:
        from mlflow.exceptions import MlflowException

        def delete() -> None:
            try:
                self.client.delete_registered_model_alias(self.name, alias)
            except MlflowException as error:
                if error.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise

        self.call(delete)

    def tag(self, version: str | int, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            self.call(self.client.set_model_version_tag, self.name, str(version), key, str(value))

    def delete_version(self, version: str | int) -> None:
        from mlflow.exceptions import MlflowException

        with contextlib.suppress(MlflowException, LLMOpsError):
            self.call(self.client.delete_model_version, self.name, str(version))

    def aliases_of(self, version: str | int) -> list[str]:
        return list(self.version(version).aliases)

    def describe(self, version: str | int, description: str) -> None:
        self.call(self.client.update_model_version, self.name, str(version), description=description)

    @contextlib.contextmanager
    def lock(self, purpose: str) -> Iterator[None]:
        """Hold the registry-wide promotion lock (see module docstring)."""
        lock_name = f"{self.name}--promotion-lock"
        owner = f"{getpass.getuser()}@{socket.gethostname()}:{os.getpid()}"
        deadline = time.monotonic() + self.settings.lock_timeout_seconds
        while True:
            try:
                self.call(self.client.create_registered_model, lock_name,
                          tags={"owner": owner, "purpose": purpose,
                                "expires": str(time.time() + self.settings.lock_lease_seconds)},
                          description="Held while a promotion or rollback of "
                                      f"'{self.name}' runs; deleted when it ends.")
                break
            except RegistryError as error:
                if "already exists" not in str(error).lower():
                    raise
            holder = self._lock_holder(lock_name)
            if holder is not None and time.time() > float(holder.get("expires", "inf")):
                logger.warning("registry lock held by %s expired; taking it over", holder.get("owner"))
                self._delete_lock(lock_name)
                continue
            if time.monotonic() > deadline:
                raise RegistryBusy(
                    f"another promotion of '{self.name}' holds the registry lock ({holder or 'unknown holder'}); "
                    "try again later, or delete the registered model "
                    f"'{lock_name}' if its holder is gone"
                )
            time.sleep(0.2)
        try:
            yield
        finally:
            self._delete_lock(lock_name)

    def _lock_holder(self, lock_name: str) -> dict[str, str] | None:
        from mlflow.exceptions import MlflowException

        try:
            return dict(self.client.get_registered_model(lock_name).tags)
        except MlflowException:
            return None

    def _delete_lock(self, lock_name: str) -> None:
        from mlflow.exceptions import MlflowException

        with contextlib.suppress(MlflowException):
            self.call(self.client.delete_registered_model, lock_name)


def champion_model(params: Params, dtype: str) -> CausalLM | None:
    """The current champion as a CausalLM (None when no version holds the alias).

    Loaded from the version's data alone (pipelines/packaging.py, `load_registered`): no code
    stored in the registry runs and no pickle is read.
    """
    from pipelines.packaging import load_registered

    registry = Registry(params)
    version = registry.alias(CHAMPION)
    if version is None:
        logger.info("no champion registered for '%s': comparing with the base model only", registry.name)
        return None
    lm = load_registered(registry, str(version.version)).lm
    if dtype != str(lm.model.dtype).removeprefix("torch."):
        import torch

        lm.model.to(getattr(torch, dtype))
    lm.name = "champion"
    lm.registry_version = str(version.version)  # type: ignore[attr-defined]
    return lm
