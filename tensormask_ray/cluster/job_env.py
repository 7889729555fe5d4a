"""The environment variables of a job: ours, the MLflow tracking URI handed through, and the
user's `--env NAME=VALUE`; credentials refused, since a job's environment is stored with the job
and shown by the dashboard."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from ..errors import UserError
from .argv import option_value

# Environment variable names that look like credentials: never put in a job's runtime env,
# whose env_vars anyone who can read the dashboard can see.
_SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSW|CREDENTIAL|PRIVATE|ACCESS_KEY|API_KEY|AUTH", re.I)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def mlflow_passthrough(args: list[str], environ) -> str | None:
    """The MLflow tracking URI to hand to the job: the command's --mlflow-uri, else
    MLFLOW_TRACKING_URI. A URI holding credentials is refused: it would be stored with the job."""
    uri = None
    for i in range(len(args)):
        value, _ = option_value(args, i, "--mlflow-uri")
        if value is not None:
            uri = value
    uri = uri or environ.get("MLFLOW_TRACKING_URI") or None
    if uri:
        parts = urlsplit(uri)
        if parts.username or parts.password:
            raise UserError(
                "the MLflow tracking URI holds credentials, which would be stored in the job's "
                "runtime environment: give the cluster nodes MLFLOW_TRACKING_USERNAME/PASSWORD "
                "(or MLFLOW_TRACKING_TOKEN) through their own secrets instead"
            )
    return uri


def job_env(pairs: list[str], mlflow_uri: str | None, token=None) -> dict[str, str]:
    env = {"PYTHONUNBUFFERED": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    if mlflow_uri:
        env["MLFLOW_TRACKING_URI"] = mlflow_uri
    for pair in pairs:
        if "=" not in pair:
            raise UserError(f"--env {pair}: expected NAME=VALUE")
        name, value = pair.split("=", 1)
        if not _ENV_NAME.match(name):
            raise UserError(f"--env {name}: not a valid environment variable name")
        if _SECRET_NAME.search(name) or (token is not None and token.matches(value)):
            raise UserError(
                f"--env {name}: looks like a credential; a job's environment is stored with the job "
                "and shown by the dashboard. Give credentials to the cluster nodes (an instance role, "
                "a Kubernetes Secret, the image) instead"
            )
        env[name] = value
    return env


__all__ = ["job_env", "mlflow_passthrough"]
