"""Stage `deploy`: roll the registry's champion out to the running service and verify it.

The library side of the stage `deploy`; what it reads and writes, and how
it is run: pipelines/stages/deploy.py.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any

import numpy as np

from pipelines.config import settings
from pipelines.config.params import Params
from pipelines.errors import LLMOpsError
from pipelines.evaluation.metrics import rouge_l
from pipelines.io import atomic_write_json, read_parquet
from pipelines.registry.model_registry import CHAMPION, Registry
from pipelines.registry.rollback import rollback
from pipelines.serving.app import read_token

logger = logging.getLogger(__name__)

SERVICE_URL_ENV = settings.SERVICE_URL_ENV


class DeployFailed(LLMOpsError):
    """Verification of the rollout failed (the report says why)."""


class GatewayClient:
    """The running `llmops serve`, over HTTP."""

    def __init__(self, url: str, token: str, timeout: float = 60.0) -> None:
        import requests

        self.url = url.rstrip("/")
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"
        self.timeout = timeout

    def ready_version(self) -> str | None:
        return self.ready().get("model_version")

    def ready(self) -> dict[str, Any]:
        """/ready's body while the service is ready, else {}."""
        response = self.session.get(f"{self.url}/ready", timeout=10)
        return response.json() if response.status_code == 200 else {}

    def reload(self) -> None:
        response = self.session.post(f"{self.url}/admin/reload", timeout=10)
        if response.status_code == 401:
            raise LLMOpsError(f"the service at {self.url} refused the token: set the same token the service "
                              "was started with (serve.token_env / serve.token_file)")
        response.raise_for_status()

    def wait_for(self, version: str, timeout: float) -> bool:
        """Ask for a reload and wait until /ready reports `version`."""
        deadline = time.monotonic() + timeout
        self.reload()
        while time.monotonic() < deadline:
            if self.ready_version() == version:
                return True
            time.sleep(0.5)
        return False

    def complete(self, prompt: str, max_tokens: int) -> dict[str, Any]:
        import requests

        started = time.perf_counter()
        try:
            response = self.session.post(f"{self.url}/v1/chat/completions", timeout=self.timeout,
                                         json={"messages": [{"role": "user", "content": prompt}],
                                               "max_tokens": max_tokens, "temperature": 0})
        except requests.RequestException as error:
            return {"status": 0, "text": "", "version": None, "seconds": time.perf_counter() - started,
                    "error": str(error)[:200]}
        seconds = time.perf_counter() - started
        text = ""
        if response.status_code == 200:
            text = response.json()["choices"][0]["message"]["content"]
        return {"status": response.status_code, "text": text, "version": response.headers.get("X-Model-Version"),
                "seconds": seconds, "error": None if response.ok else response.text[:200]}


def canary_prompts(params: Params) -> list[tuple[str, str]]:

    test = read_parquet(params.paths.prepared_dir / "test.parquet", produced_by="prepare")
    sample = test.sample(n=min(params.deploy.canary_examples, len(test)), random_state=0)
    return list(zip(sample["prompt"], sample["response"]))


def verify(service: GatewayClient, version: str, canaries: list[tuple[str, str]], params: Params) -> dict[str, Any]:
    """Send the canaries; the figures and the list of failed checks."""

    settings = params.deploy
    answers = [service.complete(prompt, settings.canary_max_tokens) for prompt, _ in canaries]
    ok = [a["status"] == 200 and a["text"].strip() != "" for a in answers]
    served_by = sorted({str(a["version"]) for a in answers if a["status"] == 200})
    latencies = [a["seconds"] for a in answers]
    scores = rouge_l([a["text"] for a in answers], [reference for _, reference in canaries])
    figures = {"canaries": len(answers), "success_rate": float(np.mean(ok)), "rouge_l": float(np.mean(scores)),
               "p95_latency_seconds": float(np.percentile(latencies, 95)), "served_by": served_by}
    failures = []
    if figures["success_rate"] < settings.min_success_rate:
        errors = sorted({a["error"] or "empty answer" for a, good in zip(answers, ok) if not good})
        failures.append(f"success rate {figures['success_rate']:.2f} < {settings.min_success_rate:.2f} "
                        f"({'; '.join(errors)[:300]})")
    if figures["rouge_l"] < settings.min_rouge_l:
        failures.append(f"canary ROUGE-L {figures['rouge_l']:.3f} < {settings.min_rouge_l:.3f}")
    if figures["p95_latency_seconds"] > settings.max_p95_latency_seconds:
        failures.append(f"p95 latency {figures['p95_latency_seconds']:.2f} s > "
                        f"{settings.max_p95_latency_seconds:.2f} s")
    if served_by and served_by != [version]:
        failures.append(f"answers came from version(s) {', '.join(served_by)}, expected {version}")
    return {"figures": figures, "failures": failures}


def variant_failures(ready: dict[str, Any], chosen: str, version: str) -> list[str]:
    """The service serves other weights than promote chose and its /ready gives no reason (a
    gateway that reports no variant at all predates variants: nothing to compare)."""
    served = ready.get("variant")
    if served is None or served == chosen or ready.get("variant_note"):
        return []
    return [f"the service serves v{version} as {served} but promote chose {chosen}, and it says no reason why"]


def deploy(params: Params) -> dict[str, Any]:
    import requests


    registry = Registry(params)
    champion = registry.alias(CHAMPION)
    report: dict[str, Any] = {"at": datetime.now(UTC).isoformat(timespec="seconds"), "model": registry.name,
                              "champion": str(champion.version) if champion else None}
    url = settings.service_url(params.deploy).value
    if champion is None:
        return {**report, "status": "nothing-to-deploy", "reason": f"'{registry.name}' has no champion yet"}
    version = str(champion.version)
    if not url:
        reason = (f"no service configured (deploy.service_url or {SERVICE_URL_ENV}); v{version} will be "
                  "served when `llmops serve` starts or next checks the alias")
        return {**report, "status": "recorded", "reason": reason}
    service = GatewayClient(url, read_token(params.serve))
    try:
        before = service.ready_version()
    except requests.RequestException as error:
        reason = f"no service reachable at {url} ({type(error).__name__}); v{version} will be served when it starts"
        return {**report, "status": "recorded", "reason": reason, "service_url": url}
    report.update(service_url=url, served_before=before)
    failures: list[str] = []
    switched = service.wait_for(version, params.deploy.ready_timeout_seconds)
    if not switched:
        failures.append(f"the service did not report v{version} on /ready within "
                        f"{params.deploy.ready_timeout_seconds:g} s (still v{service.ready_version()})")
    else:
        # which weights serve: the variant promote chose (pipelines/quantization/choice.py) unless the
        # service says why not (its device does not serve the scheme, or serve.variant: full there)
        ready = service.ready()
        chosen = champion.tags.get("serving.variant", "full")
        report.update(variant=ready.get("variant", "full"), variant_chosen=chosen,
                      variant_note=ready.get("variant_note"))
        failures += variant_failures(ready, chosen, version)
        result = verify(service, version, canary_prompts(params), params)
        report["canary"] = result["figures"]
        failures += result["failures"]
    if not failures:
        registry.tag(version, {"deploy.status": "verified", "deploy.at": report["at"], "deploy.service_url": url,
                               "deploy.variant": report.get("variant", "full")})
        return {**report, "status": "verified"}
    report["failures"] = failures
    registry.tag(version, {"deploy.status": "failed", "deploy.at": report["at"],
                           "deploy.failures": "; ".join(failures)[:4900]})
    if not params.deploy.rollback_on_failure:
        return {**report, "status": "failed"}
    try:
        restored = rollback(params, reason=f"deploy verification failed: {'; '.join(failures)}"[:4900])
    except LLMOpsError as error:  # e.g. the first champion has nothing to go back to
        return {**report, "status": "failed", "rollback_error": str(error)}
    report["rolled_back_to"] = restored["champion"]
    if restored["champion"] != version:
        report["service_restored"] = service.wait_for(restored["champion"], params.deploy.ready_timeout_seconds)
    return {**report, "status": "rolled-back"}


def main(params: Params, strict: bool = False) -> None:
    report = deploy(params)
    atomic_write_json(params.paths.report("deployment_report"), report)
    status = report["status"]
    if status in {"verified", "recorded", "nothing-to-deploy"}:
        logger.info("deploy: %s%s", status, f" ({report['reason']})" if report.get("reason") else
                    f": v{report['champion']} serves at {report.get('service_url')}")
        return
    message = f"deploy of v{report['champion']} {status}: {'; '.join(report['failures'])}"
    if status == "rolled-back":
        message += f"; champion is back on v{report['rolled_back_to']}"
    logger.error("%s", message)
    if strict:
        raise DeployFailed(message)
