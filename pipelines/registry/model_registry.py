"""The MLflow Model Registry: versions, aliases, evidence, status, and safe concurrent promotion.

Aliases are the source of truth for what serves: `challenger` (the newest registered
candidate), `champion` (what serves), `previous-champion` (where `llmops rollback` goes
back to). The version tags agree with them:

* `promotion.status`: one current status per version (candidate, rejected, recommended,
  champion, previous-champion, retired, rolled-back), rewritten for every version an alias
  move affects;
* `history.0001`, `history.0002`, ...: an append-only history, one JSON object per event
  ({at, action, by, reason, from, to} plus details such as the gate's checks), never
  rewritten; numbered tags because MLflow has no list-valued tag;
* `rollback.*` exist only while a version's status comes from a rollback, and
  `promotion.forced_*` only while its latest gate decision was forced; the history keeps
  every earlier one;
* the version's description (the model card) ends with a section rendered from those tags:
  the status, the latest gate decision and the history table.

Every call goes through `call()`, which retries transient failures (connection errors,
HTTP 5xx, 429) with exponential backoff (tenacity) and turns a server that stays down into
one clear `RegistryUnavailable` error. Promotions hold a registry-wide lock: MLflow has no
compare-and-set on aliases, so the lock is a registered model `<name>--promotion-lock`
whose creation is atomic in MLflow's database (a unique name); it works the same for the
embedded SQLite store and for a shared tracking server. The lock carries a random token:
a create whose response was lost (the retry then sees "already exists") is recognised as
our own; the release deletes the lock only while it still holds our token; and every write
made under the lock first checks that the token is still ours and renews the lease
(fencing), so a holder whose lease ran out and was taken over stops instead of writing.
Without compare-and-set in MLflow the check and the write are two calls, so the window is
one call wide, not zero.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

from pipelines.config.params import Params
from pipelines.errors import LLMOpsError
from pipelines.model.lm import CausalLM
from pipelines.registry.tracking import client_environment, resolve_tracking_uri

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion


logger = logging.getLogger(__name__)

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous-champion"
STATUS_TAG = "promotion.status"
HISTORY_PREFIX = "history."
# Statuses a version can hold. champion / previous-champion follow the aliases; the others
# are where a version rests without one of them.
STATUSES = ("candidate", "awaiting-review", "rejected", "recommended", CHAMPION, PREVIOUS, "retired", "rolled-back")
CARD_MARKER = "<!-- llmops: the sections below are generated from this version's tags on every change -->"
# Who acts: set by the Airflow tasks (dags/llmops_training.py); absent on the command line.
TRIGGERED_BY_ENV = "LLMOPS_TRIGGERED_BY"
AIRFLOW_RUN_ENV = "LLMOPS_AIRFLOW_RUN_ID"
AIRFLOW_RUN_TYPE_ENV = "LLMOPS_AIRFLOW_RUN_TYPE"
MAX_EVENT_CHARS = 4900  # a history tag stays below the 5000 characters older MLflow schemas allow
T = TypeVar("T")


class RegistryUnavailable(LLMOpsError):
    """The tracking server / registry cannot be reached."""


class RegistryBusy(LLMOpsError):
    """Another promotion holds the registry lock for too long (or took over ours)."""


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


def _os_user() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        user = f"uid-{os.getuid()}"
    return f"{user}@{socket.gethostname()}"


def actor(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Who is acting: the Airflow user who triggered the run, else the command-line user.

    `by` is what the history and the card show: `airflow:<user>` for a run someone
    triggered, `airflow:<run type>` for one nobody did (the scheduler, an asset), and
    `cli:<os user>@<host>` outside Airflow. This is attribution, not authentication: the
    registry's own account (MLFLOW_TRACKING_USERNAME, which the tracking server did
    authenticate) is recorded beside it as `registry_user`.
    """
    env = os.environ if environ is None else environ
    os_user = _os_user()
    user = env.get(TRIGGERED_BY_ENV, "").strip()
    run_id = env.get(AIRFLOW_RUN_ENV, "").strip()
    if user:
        by = f"airflow:{user}"
    elif run_id:
        by = f"airflow:{env.get(AIRFLOW_RUN_TYPE_ENV, '').strip() or 'unknown-trigger'}"
    else:
        by = f"cli:{os_user}"
    found = {"by": by, "os_user": os_user}
    if run_id:
        found["airflow_run"] = run_id
    if env.get("MLFLOW_TRACKING_USERNAME"):
        found["registry_user"] = env["MLFLOW_TRACKING_USERNAME"]
    return found


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# --- status and history: pure functions over a version's tags ----------------------------

def history_of(tags: Mapping[str, str]) -> list[dict[str, Any]]:
    """The version's events, oldest first (a tag that is not valid JSON is shown as such)."""
    events = []
    for key in sorted(k for k in tags if re.fullmatch(rf"{re.escape(HISTORY_PREFIX)}\d+", k)):
        try:
            event = json.loads(tags[key])
        except json.JSONDecodeError:
            event = {"action": "unreadable", "reason": tags[key][:200]}
        events.append({"n": int(key.removeprefix(HISTORY_PREFIX)), **event})
    return events


def next_history_key(tags: Mapping[str, str]) -> str:
    numbers = [int(k.removeprefix(HISTORY_PREFIX)) for k in tags
               if re.fullmatch(rf"{re.escape(HISTORY_PREFIX)}\d+", k)]
    return f"{HISTORY_PREFIX}{max(numbers, default=0) + 1:04d}"


def alias_status(aliases: list[str] | set[str]) -> str | None:
    """The status the aliases impose (None when the version holds neither)."""
    if CHAMPION in aliases:
        return CHAMPION
    if PREVIOUS in aliases:
        return PREVIOUS
    return None


def event_json(event: dict[str, Any]) -> str:
    """One history entry as JSON, shortened (reason, then check details) to fit one tag."""
    text = json.dumps(event, sort_keys=True)
    if len(text) > MAX_EVENT_CHARS and event.get("reason"):
        event = {**event, "reason": event["reason"][:1000] + " [...]"}
        text = json.dumps(event, sort_keys=True)
    if len(text) > MAX_EVENT_CHARS and event.get("checks"):
        event = {**event, "checks": [[n, p, d[:300]] for n, p, d in event["checks"]]}
        text = json.dumps(event, sort_keys=True)
    return text[:MAX_EVENT_CHARS] if len(text) > MAX_EVENT_CHARS else text


def _cell(value: Any) -> str:
    return str(value if value not in (None, "") else "").replace("|", "\\|").replace("\n", " ")


def render_state(aliases: list[str], tags: Mapping[str, str]) -> str:
    """The generated end of a model card: current status, latest gate decision, history."""
    status = tags.get(STATUS_TAG, "candidate")
    lines = [CARD_MARKER, "", f"## Status: **{status}**", "",
             f"Aliases: {', '.join(sorted(aliases)) or 'none'}. The status follows the aliases; the history "
             "below is append-only (tags `history.NNNN`).", ""]
    events = history_of(tags)
    decisions = [e for e in events if e.get("checks") is not None]
    if decisions:
        last = decisions[-1]
        verdict = ("PROMOTED" if last.get("to") == CHAMPION else
                   "AWAITING HUMAN REVIEW" if last.get("action") == "awaiting-review" else "NOT PROMOTED")
        lines += [f"## Latest gate decision ({last.get('at', '?')}, event {last['n']})", "",
                  f"**{verdict}** (gate {'passed' if last.get('gate_passed') else 'failed'}, mode "
                  f"{last.get('mode', '?')}{', forced by ' + last.get('by', '?') if last.get('forced') else ''})", ""]
        # an advisory check (promote.human_review: advisory) that did not pass is advice, not a failure
        lines += [f"- {'pass' if passed else 'note' if name.endswith('(advisory)') else 'FAIL'} `{name}`: {detail}"
                  for name, passed, detail in last["checks"]]
        if last.get("reason"):
            lines.append(f"- reason: {last['reason']}")
        lines.append("")
    lines += render_review(tags)
    lines += render_variants(tags)
    lines += ["## History", "", "| # | when (UTC) | action | by | status | reason |", "|---|---|---|---|---|---|"]
    for e in events:
        by = e.get("by", "")
        if e.get("airflow_run"):
            by += f" (run {e['airflow_run']})"
        change = f"{e.get('from') or '-'} -> {e.get('to') or '-'}"
        lines.append(f"| {e['n']} | {_cell(e.get('at'))} | {_cell(e.get('action'))} | {_cell(by)} | {_cell(change)} "
                     f"| {_cell(e.get('reason'))} |")
    return "\n".join(lines) + "\n"


def render_variants(tags: Mapping[str, str]) -> list[str]:
    """The model card's "Quantized variants" and "Serving" sections, from the tags of the stage
    `quantize` (`variant.<name>.*`, pipelines/quantization/evaluation.py) and promote's choice
    (`serving.variant*`, pipelines/quantization/choice.py)."""
    if "variants.measured_on" not in tags:
        return render_serving(tags)
    metric = tags.get("variants.metric", "?")
    lines = ["## Quantized variants", "",
             f"Each variant answered the evaluated test examples on vLLM beside full precision, measured on "
             f"{tags['variants.measured_on']} at {tags.get('variants.concurrency', '?')} requests in flight; the "
             f"difference is variant minus full precision on {metric} with its paired-bootstrap interval "
             "(`variants/results.json` of this version's run has every slice).", ""]
    made = [n for n in tags.get("variants.made", "").split(",") if n and n != "none"]
    if made:
        lines += [f"| weights | scheme | {metric} | vs full precision | worst slice | tokens/s | req/s | RSS (MiB) | "
                  "on disk (MiB) | cost per 1k tokens |", "|---|---|---|---|---|---|---|---|---|---|"]
        columns = [("scheme", "-"), (metric, ""), ("delta", "(reference)"), ("worst_slice", "-"),
                   ("tokens_per_second", ""), ("requests_per_second", ""), ("rss_mib", ""), ("disk_mib", ""),
                   ("cost_per_1k_tokens", "")]
        for name in ["full", *made]:
            cells = [_cell(tags.get(f"variant.{name}.{key}", default)) for key, default in columns]
            lines.append(f"| {'full precision' if name == 'full' else name} | " + " | ".join(cells) + " |")
        lines.append("")
    else:
        lines += [f"No variant was made: {tags.get('variants.note', 'none requested')}.", ""]
    if tags.get("variants.skipped"):
        lines += [f"Not made here: {tags['variants.skipped']}.", ""]
    return lines + render_serving(tags)


def render_serving(tags: Mapping[str, str]) -> list[str]:
    """Which weights serve the version, as promote chose (`serving.variant*`)."""
    if "serving.variant" not in tags:
        return []
    chosen = tags["serving.variant"]
    return ["## Serving", "", f"**{'Full precision' if chosen == 'full' else 'Variant ' + chosen}** serves this "
            f"version (promote.variant): {tags.get('serving.variant_reason', '')}", ""]


def render_review(tags: Mapping[str, str]) -> list[str]:
    """The model card's "Human review" section, from the `review.*` tags of `llmops review request/collect`."""
    if "review.requested_at" not in tags:
        return []
    lines = ["## Human review", "",
             f"Blind A/B review against {tags.get('review.opponent') or 'the opponent'} in Label Studio "
             f"(project {tags.get('review.project_id', '?')}, {tags.get('review.tasks', '?')} tasks sent "
             f"{tags['review.requested_at']}).", ""]
    if "review.collected_at" not in tags:
        return lines + ["No judgements collected yet (`llmops review collect`).", ""]
    confidence = int(round(float(tags.get("review.confidence") or 0.95) * 100))
    rate = tags.get("review.win_rate") or "n/a"
    lines += [f"Collected {tags['review.collected_at']}: **win rate {rate}** ({confidence}% CI "
              f"[{tags.get('review.win_rate_low') or '-'}, {tags.get('review.win_rate_high') or '-'}], ties count "
              f"half) from {tags.get('review.judgements', '0')} judgements on {tags.get('review.judged_tasks', '0')} "
              f"tasks by {tags.get('review.reviewers', '0')} reviewer(s).", "",
              "| | judgements | wins | losses | ties | win rate |", "|---|---|---|---|---|---|",
              f"| all | {tags.get('review.judgements', '0')} | {tags.get('review.wins', '0')} | "
              f"{tags.get('review.losses', '0')} | {tags.get('review.ties', '0')} | {rate} |"]
    for source in ("test", "production"):
        if f"review.{source}.judgements" in tags:
            lines.append(f"| {source} prompts | {tags[f'review.{source}.judgements']} | | | | "
                         f"{tags.get(f'review.{source}.win_rate') or 'n/a'} |")
    alpha = tags.get("review.agreement_alpha")
    shared = tags.get("review.agreement_tasks", "0")
    lines += ["", f"Agreement between reviewers (Krippendorff's alpha, nominal): {alpha} over {shared} tasks judged "
              "by two or more." if alpha else f"Agreement between reviewers: not measurable ({shared} tasks judged "
              "by two or more people, or all their answers alike).", ""]
    agreement = parse_metric_agreement(tags)
    if agreement:
        lines += ["Automatic metrics against the reviewers (test-split tasks with a majority): how often each "
                  f"metric prefers the answer people preferred ({confidence}% Wilson interval; a metric that "
                  "scores both answers alike abstains).", "",
                  "| metric | agrees with people | interval | tasks |", "|---|---|---|---|"]
        def shown(value: float | int | None, empty: str) -> str:
            return empty if value is None else f"{value:.4f}"

        for metric, entry in sorted(agreement.items()):
            lines.append(f"| {metric} | {shown(entry['rate'], 'n/a')} | [{shown(entry['low'], '-')}, "
                         f"{shown(entry['high'], '-')}] | {entry['tasks']} |")
        lines.append("")
    return lines


def card_head(description: str | None) -> str:
    """The part of a model card that register wrote (everything before the generated sections)."""
    return (description or "").split(CARD_MARKER, 1)[0].rstrip()


class Registry:
    """A thin, retrying view of MLflow's client for one registered model."""

    def __init__(self, params: Params) -> None:
        from mlflow import MlflowClient


        client_environment()
        self.params = params
        self.settings = params.registry
        self.name = params.registry.model_name
        self.uri = resolve_tracking_uri(params.tracking)
        self.client: MlflowClient = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        self._held: dict[str, Any] | None = None  # the lock this object holds: name, token, expires

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

    def alias_version(self, alias: str) -> str | None:
        found = self.alias(alias)
        return str(found.version) if found is not None else None

    # --- writes (fenced while this object holds the lock) ---------------------------------

    def set_alias(self, alias: str, version: str | int) -> None:
        self._fence()
        self.call(self.client.set_registered_model_alias, self.name, alias, str(version))

    def delete_alias(self, alias: str) -> None:
        from mlflow.exceptions import MlflowException

        def delete() -> None:
            try:
                self.client.delete_registered_model_alias(self.name, alias)
            except MlflowException as error:
                if error.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise

        self._fence()
        self.call(delete)

    def tag(self, version: str | int, tags: dict[str, Any]) -> None:
        self._fence()
        for key, value in tags.items():
            self.call(self.client.set_model_version_tag, self.name, str(version), key, str(value))

    def untag(self, version: str | int, keys: list[str]) -> None:
        from mlflow.exceptions import MlflowException

        self._fence()
        for key in keys:
            with contextlib.suppress(MlflowException):
                self.call(self.client.delete_model_version_tag, self.name, str(version), key)

    def delete_version(self, version: str | int) -> None:
        from mlflow.exceptions import MlflowException

        with contextlib.suppress(MlflowException, LLMOpsError):
            self.call(self.client.delete_model_version, self.name, str(version))

    def aliases_of(self, version: str | int) -> list[str]:
        return list(self.version(version).aliases)

    def describe(self, version: str | int, description: str) -> None:
        self._fence()
        self.call(self.client.update_model_version, self.name, str(version), description=description)

    def record(self, version: str | int, action: str, *, reason: str = "", by: dict[str, str] | None = None,
               status: str | None = None, tags: dict[str, Any] | None = None,
               details: dict[str, Any] | None = None) -> dict[str, Any]:
        """Append one event to a version's history, set its status, and re-render its card.

        The status is the one its aliases impose (call after moving them), else `status`
        (else the current one). `tags` are set with it; `rollback.*` tags that `tags` does
        not set again are removed, because they describe a status the version no longer has.
        """
        current = self.version(version)
        aliases = list(current.aliases)
        old_status = current.tags.get(STATUS_TAG)
        new_status = alias_status(aliases) or status or old_status or "candidate"
        who = by or actor()
        event = {"at": now(), "action": action, "by": who["by"], "reason": reason, "from": old_status,
                 "to": new_status, **{k: v for k, v in who.items() if k != "by"}, **(details or {})}
        new_tags = {str(k): str(v) for k, v in (tags or {}).items()}
        new_tags[STATUS_TAG] = new_status
        key = next_history_key(current.tags)
        new_tags[key] = event_json(event)
        stale = [k for k in current.tags if k.startswith("rollback.") and k not in new_tags]
        self.tag(version, new_tags)
        self.untag(version, stale)
        merged = {**{k: v for k, v in current.tags.items() if k not in stale}, **new_tags}
        self.describe(version, card_head(current.description) + "\n\n" + render_state(aliases, merged))
        logger.info("registry: %s v%s %s (%s -> %s) by %s", self.name, version, action, old_status, new_status,
                    who["by"])
        return {"n": int(key.removeprefix(HISTORY_PREFIX)), **event}

    def update_model(self, description: str, tags: dict[str, Any]) -> None:
        """The registered model's own description and tags (what `mlflow ui` shows above the versions)."""
        self.call(self.client.update_registered_model, self.name, description=description)
        for key, value in tags.items():
            self.call(self.client.set_registered_model_tag, self.name, key, str(value))

    # --- the promotion lock ---------------------------------------------------------------

    @property
    def lock_name(self) -> str:
        return f"{self.name}--promotion-lock"

    @contextlib.contextmanager
    def lock(self, purpose: str) -> Iterator[None]:
        """Hold the registry-wide promotion lock (see module docstring)."""
        lock_name = self.lock_name
        token = uuid.uuid4().hex
        owner = f"{_os_user()}:{os.getpid()}"
        deadline = time.monotonic() + self.settings.lock_timeout_seconds
        while True:
            expires = time.time() + self.settings.lock_lease_seconds
            try:
                self.call(self.client.create_registered_model, lock_name,
                          tags={"owner": owner, "token": token, "purpose": purpose, "expires": str(expires)},
                          description="Held while a promotion or rollback of "
                                      f"'{self.name}' runs; deleted when it ends.")
                break
            except RegistryError as error:
                if "already exists" not in str(error).lower():
                    raise
            except RegistryUnavailable:
                # the create may have gone through with its answer lost: do not leave it behind
                with contextlib.suppress(LLMOpsError):
                    self._release(lock_name, token)
                raise
            holder = self._lock_holder(lock_name)
            if holder is not None and holder.get("token") == token:
                # Our own create went through but its response was lost; the retry saw "already exists".
                logger.info("registry lock %s: an earlier attempt of this process created it", lock_name)
                expires = float(holder.get("expires", expires))
                break
            if holder is not None and time.time() > float(holder.get("expires", "inf")):
                logger.warning("registry lock held by %s expired; taking it over", holder.get("owner"))
                self._release(lock_name, holder.get("token"))
                continue
            if time.monotonic() > deadline:
                raise RegistryBusy(
                    f"another promotion of '{self.name}' holds the registry lock ({holder or 'unknown holder'}); "
                    "try again later, or delete the registered model "
                    f"'{lock_name}' if its holder is gone"
                )
            time.sleep(0.2)
        self._held = {"name": lock_name, "token": token, "expires": expires}
        try:
            yield
        finally:
            self._held = None
            self._release(lock_name, token)

    def _fence(self) -> None:
        """Before a write under the lock: the lock must still be ours; renew its lease when half spent."""
        if self._held is None:
            return
        held = self._held
        holder = self._lock_holder(held["name"])
        if holder is None or holder.get("token") != held["token"]:
            raise RegistryBusy(
                f"this promotion of '{self.name}' lost the registry lock (its lease of "
                f"{self.settings.lock_lease_seconds:.0f} s ran out and {holder.get('owner') if holder else 'nobody'} "
                "holds it now); it stopped before writing more. Re-run it, or raise registry.lock_lease_seconds")
        lease = self.settings.lock_lease_seconds
        if held["expires"] - time.time() < lease / 2:
            held["expires"] = time.time() + lease
            self.call(self.client.set_registered_model_tag, held["name"], "expires", str(held["expires"]))

    def _lock_holder(self, lock_name: str) -> dict[str, str] | None:
        from mlflow.exceptions import MlflowException

        try:
            return dict(self.call(self.client.get_registered_model, lock_name).tags)
        except (MlflowException, RegistryError):
            return None

    def _release(self, lock_name: str, token: str | None) -> None:
        """Delete the lock, but only while it holds `token` (a taken-over lock is not ours to delete)."""
        from mlflow.exceptions import MlflowException

        holder = self._lock_holder(lock_name)
        if holder is None:
            return
        if holder.get("token") != token:
            logger.warning("registry lock %s is held by %s now, not by this process; left in place", lock_name,
                           holder.get("owner"))
            return
        with contextlib.suppress(MlflowException, RegistryError):
            self.call(self.client.delete_registered_model, lock_name)


METRIC_AGREEMENT_TAG = "review.metric_agreement."  # + <metric>.rate | .low | .high | .tasks (`llmops review collect`)


def parse_metric_agreement(tags: Mapping[str, str]) -> dict[str, dict[str, float | int | None]]:
    """{metric: {rate, low, high, tasks}} from a version's review.metric_agreement.* tags."""
    out: dict[str, dict[str, float | int | None]] = {}
    for key, value in tags.items():
        if not key.startswith(METRIC_AGREEMENT_TAG):
            continue
        metric, field = key[len(METRIC_AGREEMENT_TAG):].rsplit(".", 1)
        entry = out.setdefault(metric, {"rate": None, "low": None, "high": None, "tasks": 0})
        if field == "tasks":
            entry["tasks"] = int(value or 0)
        elif field in entry:
            entry[field] = float(value) if value else None
    return out


def latest_metric_agreement(params: Params) -> tuple[str | None, dict[str, dict[str, float | int | None]]]:
    """The metric agreement of the newest version whose reviews were collected: (version, by metric)."""
    registry = Registry(params)
    versions = registry.call(registry.client.search_model_versions, f"name='{registry.name}'")
    reviewed = [v for v in versions if any(k.startswith(METRIC_AGREEMENT_TAG) for k in (v.tags or {}))]
    if not reviewed:
        return None, {}
    newest = max(reviewed, key=lambda v: int(v.version))
    return str(newest.version), parse_metric_agreement(newest.tags)


def champion_model(params: Params, dtype: str) -> CausalLM | None:
    """The current champion as a CausalLM (None when no version holds the alias).

    Loaded from the version's data alone (pipelines/model/packaging.py, `load_registered`): no code
    stored in the registry runs and no pickle is read.
    """
    from pipelines.model.packaging import load_registered  # packaging imports mlflow

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
