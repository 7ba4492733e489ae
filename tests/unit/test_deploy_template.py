"""The deployment as CloudFormation sees it: serverless.yml packaged offline by osls (stage ci),
infra/github-oidc-deploy-role.yml, the Lambda code package and the GitHub workflows.

The template is `.serverless/cloudformation-template-update-stack.json` when `make template`
(which .ci/run runs first) left one newer than serverless.yml; else this module packages into a
temporary folder itself, building the code package first if there is none, so `make test` alone
checks everything. Needs Node.js 20.19+ for npx; no AWS account.
"""

from __future__ import annotations

import datetime as dt
import email
import fcntl
import json
import os
import re
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import SecretStr

from shared import metrics
from shared.errors import TokenRefreshFailed
from shared.message_ref import UidKey
from shared.outcome_lines import outcome_fields
from shared.pipeline.copier import CopyResult, Outcome
from shared.settings import Settings
from shared.state import dynamodb as dynamo_state
from shared.tokens.sources import MicrosoftTokenSource

ROOT = Path(__file__).resolve().parents[2]
STAGE = "ci"
SERVICE = "mail-syncer"
TEMPLATE_NAME = "cloudformation-template-update-stack.json"
LAMBDA_ZIP = ROOT / "build" / "lambda" / "mail-syncer.zip"
LOCK = ROOT / "uv.lock"
DEPLOY_ROLE_TEMPLATE = ROOT / "infra" / "github-oidc-deploy-role.yml"
WORKFLOWS = ROOT / ".github" / "workflows"
BIN = Path(sys.executable).parent  # cfn-lint and actionlint come with the test extra

FUNCTION_ENVIRONMENT = {
    "STATE_TABLE",
    "QUEUE_URL",
    "DLQ_URL",
    "AWS_SECRETS_MANAGER_SECRET_IDS",
    "MAX_ATTEMPTS",
    "MAX_RECEIVE_COUNT",
    "LOG_LEVEL",
}
SECRET_IDS = [f"{SERVICE}/{STAGE}/routes", f"{SERVICE}/{STAGE}/destination"]
ROUTES_SECRET, DESTINATION_SECRET = (f"secret:{name}-??????" for name in SECRET_IDS)

# Every action each function's role grants, and on what: a resource of this stack (logical id),
# or one of the two secrets by name. Anything added to serverless.yml must be added here too.
PRODUCER_GRANTS = {
    ("logs:CreateLogStream", "ProducerLogGroup"),
    ("logs:PutLogEvents", "ProducerLogGroup"),
    ("dynamodb:GetItem", "StateTable"),
    ("dynamodb:PutItem", "StateTable"),
    ("dynamodb:UpdateItem", "StateTable"),
    ("sqs:SendMessage", "RefQueue"),
    ("secretsmanager:GetSecretValue", ROUTES_SECRET),
    ("secretsmanager:GetSecretValue", DESTINATION_SECRET),
}
CONSUMER_GRANTS = {
    ("logs:CreateLogStream", "ConsumerLogGroup"),
    ("logs:PutLogEvents", "ConsumerLogGroup"),
    ("dynamodb:GetItem", "StateTable"),
    ("dynamodb:PutItem", "StateTable"),
    ("dynamodb:UpdateItem", "StateTable"),
    ("dynamodb:DeleteItem", "StateTable"),
    ("dynamodb:BatchGetItem", "StateTable"),
    ("dynamodb:Query", "StateTable"),
    ("sqs:ReceiveMessage", "RefQueue"),
    ("sqs:DeleteMessage", "RefQueue"),
    ("sqs:ChangeMessageVisibility", "RefQueue"),
    ("sqs:GetQueueAttributes", "RefQueue"),
    ("sqs:SendMessage", "DeadLetterQueue"),
    ("secretsmanager:GetSecretValue", ROUTES_SECRET),
    ("secretsmanager:GetSecretValue", DESTINATION_SECRET),
    ("secretsmanager:PutSecretValue", DESTINATION_SECRET),
    ("secretsmanager:UpdateSecretVersionStage", DESTINATION_SECRET),
}


# -- fixtures ----------------------------------------------------------------------------


def _newer_than(path: Path, *sources: Path) -> bool:
    return path.exists() and all(path.stat().st_mtime >= source.stat().st_mtime for source in sources)


@contextmanager
def _one_worker_at_a_time(tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[Path]:
    """Held by one pytest-xdist worker of this run at a time; yields a folder they all share
    (the run's own folder without xdist). What is made in it once serves every worker."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield shared


@pytest.fixture(scope="session")
def lambda_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The code package, built unless one newer than its recipe is there."""
    with _one_worker_at_a_time(tmp_path_factory, "lambda-zip"):
        if not _newer_than(LAMBDA_ZIP, ROOT / "infra" / "build_package.py", ROOT / "pyproject.toml", LOCK):
            subprocess.run([sys.executable, str(ROOT / "infra" / "build_package.py")], check=True, cwd=ROOT)
    return LAMBDA_ZIP


@pytest.fixture(scope="session")
def template_path(lambda_zip: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # osls packages through ROOT/.serverless whatever --package says (it empties it first, then
    # moves what it made): two at once in this checkout break each other, and one packaging
    # fills it for a while, so one worker looks and packages for all of them.
    with _one_worker_at_a_time(tmp_path_factory, "serverless") as shared:
        made = ROOT / ".serverless" / TEMPLATE_NAME
        if _newer_than(made, ROOT / "serverless.yml") and _stage_of(made) == STAGE:
            return made
        out = shared / "serverless"
        if not (out / TEMPLATE_NAME).exists():
            subprocess.run(
                ["bash", str(ROOT / "infra" / "osls.sh"), "package", "--stage", STAGE, "--package", str(out)],
                check=True,
                cwd=ROOT,
                timeout=600,
                # No AWS credentials are needed to package; make sure none are used.
                env={k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | {"AWS_REGION": "eu-west-1"},
            )
    return out / TEMPLATE_NAME


def _stage_of(path: Path) -> str | None:
    name = json.loads(path.read_text())["Resources"].get("StateTable", {}).get("Properties", {}).get("TableName", "")
    match = re.fullmatch(rf"{SERVICE}-(.+)-state", name)
    return match.group(1) if match else None


@pytest.fixture(scope="session")
def template(template_path: Path) -> dict:
    return json.loads(template_path.read_text())


@pytest.fixture(scope="session")
def resources(template: dict) -> dict:
    return template["Resources"]


def _of_type(resources: dict, kind: str) -> dict[str, dict]:
    return {name: r for name, r in resources.items() if r["Type"] == kind}


def _function(resources: dict, name: str) -> dict:
    return resources[f"{name.capitalize()}LambdaFunction"]["Properties"]


# -- the checks --------------------------------------------------------------------------


def test_cfn_lint_passes_on_the_packaged_template_and_the_deploy_role(template_path: Path) -> None:
    result = subprocess.run(
        [str(BIN / "cfn-lint"), str(template_path), str(DEPLOY_ROLE_TEMPLATE)],
        cwd=ROOT,  # .cfnlintrc.yaml
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_queue_and_dead_letter_queue_are_fifo_encrypted_and_redrive_after_max_receive_count(resources) -> None:
    queue = resources["RefQueue"]["Properties"]
    dlq = resources["DeadLetterQueue"]["Properties"]
    for props, name in ((queue, f"{SERVICE}-{STAGE}.fifo"), (dlq, f"{SERVICE}-{STAGE}-dlq.fifo")):
        assert props["QueueName"] == name
        assert props["FifoQueue"] is True
        assert props["SqsManagedSseEnabled"] is True
        # 14 days: an expired reference is never sent again (the watermark moved past it).
        assert props["MessageRetentionPeriod"] == 1209600
    assert queue["RedrivePolicy"]["deadLetterTargetArn"] == {"Fn::GetAtt": ["DeadLetterQueue", "Arn"]}
    max_receive_count = int(queue["RedrivePolicy"]["maxReceiveCount"])
    # A safety net far above the consumer's own count of a message's failures (MAX_ATTEMPTS):
    # throttles and waits behind a throttled message cost deliveries, never attempts.
    assert max_receive_count == 100
    for function in ("producer", "consumer"):
        variables = _function(resources, function)["Environment"]["Variables"]
        # The app's MAX_RECEIVE_COUNT says the same as the queue, for `status` and the local queue.
        assert variables["MAX_RECEIVE_COUNT"] == str(max_receive_count)
        assert int(variables["MAX_ATTEMPTS"]) * 10 <= max_receive_count


def test_visibility_timeout_is_at_least_six_times_the_consumer_timeout(resources) -> None:
    visibility = resources["RefQueue"]["Properties"]["VisibilityTimeout"]
    assert visibility >= 6 * _function(resources, "consumer")["Timeout"]


def test_consumer_takes_fifo_batches_of_at_most_ten_reports_item_failures_and_caps_concurrency(resources) -> None:
    (mapping,) = _of_type(resources, "AWS::Lambda::EventSourceMapping").values()
    props = mapping["Properties"]
    assert props["EventSourceArn"] == {"Fn::GetAtt": ["RefQueue", "Arn"]}
    assert props["FunctionName"] == {"Fn::GetAtt": ["ConsumerLambdaFunction", "Arn"]}
    assert 1 <= props["BatchSize"] <= 10
    assert props["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    # SQS's minimum: at most two IMAP sessions into the one Outlook mailbox at a time.
    assert props["ScalingConfig"]["MaximumConcurrency"] == 2


def test_producer_runs_on_the_schedule(resources) -> None:
    (rule,) = _of_type(resources, "AWS::Events::Rule").values()
    assert rule["Properties"]["ScheduleExpression"] == "rate(5 minutes)"
    assert rule["Properties"]["State"] == "ENABLED"
    assert [t["Arn"] for t in rule["Properties"]["Targets"]] == [{"Fn::GetAtt": ["ProducerLambdaFunction", "Arn"]}]
    (permission,) = _of_type(resources, "AWS::Lambda::Permission").values()
    assert permission["Properties"]["Principal"] == "events.amazonaws.com"
    # The producer must finish before the next run starts.
    assert _function(resources, "producer")["Timeout"] < 5 * 60


def test_functions_run_the_packaged_handlers_on_python_312(resources) -> None:
    for name in ("producer", "consumer"):
        function = _function(resources, name)
        assert function["FunctionName"] == f"{SERVICE}-{STAGE}-{name}"
        assert function["Handler"] == f"{name}/handler.handler"
        assert function["Runtime"] == "python3.12"
        # infra/build_package.py picks wheels for this architecture.
        assert function["Architectures"] == ["x86_64"]
        assert function["Code"]["S3Key"].endswith("/mail-syncer.zip")
        assert function["Role"] == {"Fn::GetAtt": [f"{name.capitalize()}Role", "Arn"]}


def test_environment_names_the_secrets_and_holds_no_secret_value(resources) -> None:
    secret_settings = {
        name.upper() for name, field in Settings.model_fields.items() if SecretStr in _types_in(field.annotation)
    }
    # Routes carry Gmail refresh tokens although the setting itself is plain text.
    secret_settings.add("SYNC_ROUTES_JSON")
    documented = (ROOT / ".env.example").read_text()
    for name in ("producer", "consumer"):
        variables = _function(resources, name)["Environment"]["Variables"]
        assert set(variables) == FUNCTION_ENVIRONMENT
        assert not set(variables) & secret_settings
        for key in variables:
            assert key.lower() in Settings.model_fields, key
            assert re.search(rf"^#? ?{key}=", documented, re.MULTILINE), f"{key} is not in .env.example"
        assert variables["AWS_SECRETS_MANAGER_SECRET_IDS"] == ",".join(SECRET_IDS)
        assert variables["STATE_TABLE"] == {"Ref": "StateTable"}
        assert variables["QUEUE_URL"] == {"Ref": "RefQueue"}
        assert variables["DLQ_URL"] == {"Ref": "DeadLetterQueue"}
        assert variables["LOG_LEVEL"] == "INFO"


def _types_in(annotation: Any) -> set:
    return {annotation, *(t for arg in getattr(annotation, "__args__", ()) for t in _types_in(arg))}


def test_state_table_matches_the_adapter_and_is_protected(resources) -> None:
    created: dict = {}

    class RecordingClient:  # what the DynamoDB adapter would create, captured
        def create_table(self, **kwargs):
            created.update(kwargs)

        def get_waiter(self, name):
            return type("Waiter", (), {"wait": lambda self, **kwargs: None})()

        def update_time_to_live(self, **kwargs):
            created["ttl"] = kwargs["TimeToLiveSpecification"]

    dynamo_state.create_state_table(RecordingClient(), "any")
    table = resources["StateTable"]
    props = table["Properties"]
    assert props["TableName"] == f"{SERVICE}-{STAGE}-state"
    assert props["KeySchema"] == created["KeySchema"]
    assert sorted(props["AttributeDefinitions"], key=str) == sorted(created["AttributeDefinitions"], key=str)
    assert props["TimeToLiveSpecification"] == created["ttl"] == {"AttributeName": "expires_at", "Enabled": True}
    assert props["BillingMode"] == "PAY_PER_REQUEST"
    assert props["PointInTimeRecoverySpecification"] == {"PointInTimeRecoveryEnabled": True}
    assert props["SSESpecification"] == {"SSEEnabled": True}
    # Stage ci is not dev: the table can be neither deleted nor dropped with the stack.
    assert props["DeletionProtectionEnabled"] is True
    assert table["DeletionPolicy"] == table["UpdateReplacePolicy"] == "Retain"


def test_each_function_has_its_own_role_with_only_what_it_needs(resources) -> None:
    # No shared role made by the framework.
    assert set(_of_type(resources, "AWS::IAM::Role")) == {"ProducerRole", "ConsumerRole"}
    for role_name, expected in (("ProducerRole", PRODUCER_GRANTS), ("ConsumerRole", CONSUMER_GRANTS)):
        role = resources[role_name]["Properties"]
        (statement,) = role["AssumeRolePolicyDocument"]["Statement"]
        assert statement["Principal"] == {"Service": "lambda.amazonaws.com"}
        assert "ManagedPolicyArns" not in role
        assert role["PermissionsBoundary"]["Fn::If"][0] == "HasPermissionsBoundary"
        grants = set()
        for policy in role["Policies"]:
            for statement in policy["PolicyDocument"]["Statement"]:
                assert statement["Effect"] == "Allow"
                assert "Condition" not in statement and "NotResource" not in statement
                targets = statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]]
                actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
                grants |= {(action, _target(target)) for action in actions for target in targets}
        assert grants == expected


# The AWS adapters, read for the calls they make, so one added there cannot go unnoticed here.
AWS_ADAPTERS = {
    "shared/state/dynamodb.py": "dynamodb",
    "shared/queue/sqs.py": "sqs",
    "shared/tokens/store.py": "secretsmanager",
    "shared/aws.py": "secretsmanager",  # read_json_secret, for settings and the token store
}
# Calls no function makes: the CLI's (status, redrive, auth ... --write-secret-id, run with the
# operator's own credentials) and the helpers that create tables and queues for the tests.
NOT_CALLED_BY_FUNCTIONS = {
    "dynamodb:CreateTable",  # create_state_table
    "dynamodb:UpdateTimeToLive",
    "sqs:CreateQueue",  # create_fifo_queue_pair
    "sqs:GetQueueUrl",  # the DLQ found from the RedrivePolicy; the functions are given DLQ_URL
    "sqs:StartMessageMoveTask",  # redrive
    "sqs:ListMessageMoveTasks",
    "secretsmanager:CreateSecret",  # auth ... --write-secret-id
}
# IAM authorises a batch call with its single action, and a transaction item by item.
BATCH_ACTIONS = {"SendMessageBatch": "SendMessage", "DeleteMessageBatch": "DeleteMessage",
                 "ChangeMessageVisibilityBatch": "ChangeMessageVisibility"}  # fmt: skip


def _adapter_actions() -> set[str]:
    actions = set()
    for path, service in AWS_ADAPTERS.items():
        text = (ROOT / path).read_text()
        calls = re.findall(r"client\.([a-z_]+)\(", text) + re.findall(r'_call\(\s*"([a-z_]+)"', text)
        for call in set(calls) - {"get_waiter"}:
            name = "".join(part.capitalize() for part in call.split("_"))
            if name == "TransactWriteItems":
                items = re.findall(r'\{"(Put|Update|Delete|ConditionCheck)":', text)
                actions |= {f"dynamodb:{kind}Item" for kind in items}
            else:
                actions.add(f"{service}:{BATCH_ACTIONS.get(name, name)}")
    return actions


def test_every_aws_call_the_functions_can_make_is_granted_to_one_of_them() -> None:
    called = _adapter_actions()
    assert NOT_CALLED_BY_FUNCTIONS <= called  # the list above is not out of date
    granted = {action for action, _ in PRODUCER_GRANTS | CONSUMER_GRANTS}
    assert called - NOT_CALLED_BY_FUNCTIONS <= granted, (called - NOT_CALLED_BY_FUNCTIONS) - granted
    # Nothing granted that the code never calls (logs are written by the runtime).
    assert {a for a in granted if not a.startswith("logs:")} <= called - NOT_CALLED_BY_FUNCTIONS


def _target(resource: Any) -> str:
    """A logical id for `GetAtt X.Arn`; `secret:<name>-??????` for a secret ARN built with Join."""
    if isinstance(resource, dict) and "Fn::GetAtt" in resource:
        name, attribute = resource["Fn::GetAtt"]
        assert attribute == "Arn"
        return name
    if isinstance(resource, dict) and "Fn::Join" in resource:
        separator, parts = resource["Fn::Join"]
        rendered = separator.join(p if isinstance(p, str) else "{" + p["Ref"] + "}" for p in parts)
        prefix = "arn:{AWS::Partition}:secretsmanager:{AWS::Region}:{AWS::AccountId}:"
        assert rendered.startswith(prefix), rendered
        return rendered.removeprefix(prefix)
    raise AssertionError(f"resource not limited to this stack: {resource!r}")


def test_alarms_watch_dead_letters_and_both_functions_errors_and_mail_when_asked(template, resources) -> None:
    alarms = {a["Properties"]["AlarmName"]: a["Properties"] for a in _of_type(resources, "AWS::CloudWatch::Alarm").values()}
    assert set(alarms) == {
        f"{SERVICE}-{STAGE}-{n}"
        for n in ("dead-letters", "producer-errors", "consumer-errors", "stalled-route", "refused-token")
    }
    dead = alarms[f"{SERVICE}-{STAGE}-dead-letters"]
    assert (dead["Namespace"], dead["MetricName"]) == ("AWS/SQS", "ApproximateNumberOfMessagesVisible")
    assert dead["Dimensions"] == [{"Name": "QueueName", "Value": {"Fn::GetAtt": ["DeadLetterQueue", "QueueName"]}}]
    for function in ("producer", "consumer"):
        errors = alarms[f"{SERVICE}-{STAGE}-{function}-errors"]
        assert (errors["Namespace"], errors["MetricName"], errors["Statistic"]) == ("AWS/Lambda", "Errors", "Sum")
        assert errors["Dimensions"] == [
            {"Name": "FunctionName", "Value": {"Ref": f"{function.capitalize()}LambdaFunction"}}
        ]
    for name, alarm in alarms.items():
        # Above zero: one dead letter, one failed invocation or one refused token is enough.
        threshold = STALLED_ROUTE_SECONDS if name.endswith("-stalled-route") else 0
        assert (alarm["ComparisonOperator"], alarm["Threshold"]) == ("GreaterThanThreshold", threshold)
        assert alarm["AlarmActions"] == {"Fn::If": ["HasAlarmEmail", [{"Ref": "AlarmTopic"}], {"Ref": "AWS::NoValue"}]}
    topic = resources["AlarmTopic"]
    assert topic["Condition"] == "HasAlarmEmail"
    assert topic["Properties"]["Subscription"] == [{"Protocol": "email", "Endpoint": {"Ref": "AlarmEmail"}}]
    assert template["Parameters"]["AlarmEmail"]["Default"] == ""
    assert template["Parameters"]["PermissionsBoundaryName"]["Default"] == "mail-syncer-lambda-boundary"
    assert template["Conditions"]["HasAlarmEmail"] == {"Fn::Not": [{"Fn::Equals": [{"Ref": "AlarmEmail"}, ""]}]}


# The stalled-route alarm's threshold: twelve runs of the producer's 5-minute schedule.
STALLED_ROUTE_SECONDS = 12 * 5 * 60


def test_stalled_route_alarm_watches_the_queues_oldest_message_for_twelve_producer_runs(resources) -> None:
    (rule,) = _of_type(resources, "AWS::Events::Rule").values()
    minutes = int(re.fullmatch(r"rate\((\d+) minutes\)", rule["Properties"]["ScheduleExpression"])[1])
    alarm = resources["StalledRouteAlarm"]["Properties"]
    assert alarm["AlarmName"] == f"{SERVICE}-{STAGE}-stalled-route"
    assert (alarm["Namespace"], alarm["MetricName"], alarm["Statistic"]) == ("AWS/SQS", "ApproximateAgeOfOldestMessage", "Maximum")
    assert alarm["Dimensions"] == [{"Name": "QueueName", "Value": {"Fn::GetAtt": ["RefQueue", "QueueName"]}}]
    assert alarm["Threshold"] == STALLED_ROUTE_SECONDS == 12 * minutes * 60
    # Past a failing message's retries: each waits out the queue's visibility timeout.
    assert alarm["Threshold"] > 3 * resources["RefQueue"]["Properties"]["VisibilityTimeout"]


def _matches(pattern: str, text: str) -> bool:
    """CloudWatch Logs' filter pattern of quoted terms: every term in the event's text."""
    terms = re.findall(r'"([^"]+)"', pattern)
    assert terms and pattern == " ".join(f'"{t}"' for t in terms), f"not a pattern of quoted terms: {pattern}"
    return all(term in text for term in terms)


def _refresh_failure(error: str) -> TokenRefreshFailed:
    """What a Microsoft token endpoint's answer `error` makes of a refresh (msal stood in for)."""

    class Endpoint:
        def acquire_token_by_refresh_token(self, refresh_token, scopes):
            return {"error": error, "error_description": "AADSTS70000: the grant is not valid"}

    tokens = MicrosoftTokenSource(
        account="me@outlook.com", refresh_token="M.R3_refresh-token", client_id="c", authority="https://login.example/consumers"
    )
    tokens._app = Endpoint()
    with pytest.raises(TokenRefreshFailed) as caught:
        tokens.access_token()
    return caught.value


def test_refused_tokens_are_counted_from_both_functions_logs_and_alarm(resources) -> None:
    filters = _of_type(resources, "AWS::Logs::MetricFilter")
    assert {f["Properties"]["LogGroupName"]["Ref"] for f in filters.values()} == {"ProducerLogGroup", "ConsumerLogGroup"}
    for metric_filter in filters.values():
        (transformation,) = metric_filter["Properties"]["MetricTransformations"]
        assert transformation == {"MetricNamespace": f"{SERVICE}-{STAGE}", "MetricName": "TokensRefused", "MetricValue": "1", "Unit": "Count"}
        pattern = metric_filter["Properties"]["FilterPattern"]
        # Matches the text of a refused token's error (in every line that reports it), and
        # not an endpoint's other answers, which a retry can get past.
        refused, other = _refresh_failure("invalid_grant"), _refresh_failure("invalid_client")
        assert refused.refused and _matches(pattern, str(refused))
        assert not other.refused and not _matches(pattern, str(other))
    alarm = resources["TokensRefusedAlarm"]["Properties"]
    assert alarm["AlarmName"] == f"{SERVICE}-{STAGE}-refused-token"
    assert (alarm["Namespace"], alarm["MetricName"], alarm["Statistic"]) == (f"{SERVICE}-{STAGE}", "TokensRefused", "Sum")
    assert alarm["TreatMissingData"] == "notBreaching"


def test_both_functions_write_lambdas_json_log_format(resources) -> None:
    for name in ("producer", "consumer"):
        # The runtime's formatter: each record one JSON object, its extra= fields as keys.
        assert _function(resources, name)["LoggingConfig"] == {"LogFormat": "JSON"}


def _consumer_metric_names() -> set[str]:
    """Every metric the consumer writes (shared.metrics), from a batch that has each kind."""
    arrived = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    results = [
        CopyResult(Outcome.COPIED, UidKey("r", 1, 1), dest_uid=1, size=10, internaldate=arrived),
        CopyResult(Outcome.PAUSED, UidKey("r", 1, 2), "destination paused until ...", retry_after=5),
    ]
    documents = metrics.batch_documents(results, namespace="any", now=arrived.timestamp() + 60)
    return {m["Name"] for d in documents for directive in d["_aws"]["CloudWatchMetrics"] for m in directive["Metrics"]}


def _widget_metrics(widget: dict) -> set[tuple[str, str]]:
    """(namespace, metric) of each line of a metric widget, SEARCH expressions included."""
    found = set()
    namespace = None
    for line in widget["properties"]["metrics"]:
        if isinstance(line[0], dict):
            search = re.fullmatch(r"""SEARCH\('\{"([^"]+)",[^}]*\} MetricName="(\w+)"', '\w+', \d+\)""", line[0]["expression"])
            assert search, line[0]["expression"]
            found.add((search[1], search[2]))
            continue
        names = [part for part in line if not isinstance(part, dict)]
        namespace = namespace if names[0] == "." else names[0]
        found.add((namespace, names[1]))
    return found


def test_dashboard_shows_the_consumers_metrics_the_queues_and_the_functions(resources) -> None:
    dashboard = resources["Dashboard"]["Properties"]
    assert dashboard["DashboardName"] == f"{SERVICE}-{STAGE}"
    widgets = json.loads(dashboard["DashboardBody"])["widgets"]
    shown = {(widget["properties"]["title"], m) for widget in widgets if widget["type"] == "metric" for m in _widget_metrics(widget)}
    metrics_shown = {m for _, m in shown}
    namespace = f"{SERVICE}-{STAGE}"
    assert {(namespace, name) for name in _consumer_metric_names()} <= metrics_shown
    assert (namespace, "TokensRefused") in metrics_shown
    queue, dlq = f"{SERVICE}-{STAGE}.fifo", f"{SERVICE}-{STAGE}-dlq.fifo"
    lines = [line for w in widgets if w["type"] == "metric" for line in w["properties"]["metrics"] if isinstance(line[0], str)]
    assert ["AWS/SQS", "ApproximateNumberOfMessagesVisible", "QueueName", queue] in lines
    assert ["AWS/SQS", "ApproximateAgeOfOldestMessage", "QueueName", queue, {"yAxis": "right"}] in lines
    assert ["AWS/SQS", "ApproximateNumberOfMessagesVisible", "QueueName", dlq] in lines
    for function in ("producer", "consumer"):
        for metric in ("Errors", "Throttles"):
            assert ["AWS/Lambda", metric, "FunctionName", f"{SERVICE}-{STAGE}-{function}"] in lines
    # Per route, and throttles by provider.
    titles = {title for title, _ in shown}
    assert {"Copied per route", "Failed per route", "Throttled, by provider"} <= titles
    for provider in ("gmail", "outlook"):
        assert [namespace, "Throttled", "Provider", provider] in lines
    for widget in widgets:
        assert widget["properties"]["region"] == "eu-west-1"
    # The failures of the consumer's log, as README's query reads them.
    (log_widget,) = [w for w in widgets if w["type"] == "log"]
    assert log_widget["properties"]["query"].startswith(f"SOURCE '/aws/lambda/{SERVICE}-{STAGE}-consumer' |")
    assert 'filter outcome in ["failed", "dead-lettered"' in log_widget["properties"]["query"]


def test_readme_lists_every_widget_and_alarm_and_queries_the_fields_the_consumer_logs(resources) -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Operating in AWS: logs, metrics, dashboard, alarms", 1)[1].split("\n## ", 1)[0]
    titles = [w["properties"]["title"] for w in json.loads(resources["Dashboard"]["Properties"]["DashboardBody"])["widgets"]]
    listed = re.findall(r"^\d+\. \*(.+?)\*", section, re.M) + re.findall(r" and \d+\. \*(.+?)\*", section)
    assert sorted(listed) == sorted(titles)
    for alarm in _of_type(resources, "AWS::CloudWatch::Alarm").values():
        suffix = alarm["Properties"]["AlarmName"].removeprefix(f"{SERVICE}-{STAGE}-")
        assert f"mail-syncer-<stage>-{suffix}" in section or f"-{suffix}`" in section, suffix
    (query,) = re.findall(r"```\n(fields .+?)```", section, re.S)
    fields = set(re.findall(r"\b(route|uid|outcome|detail|message_id)\b", query))
    assert fields == {"route", "uid", "outcome", "detail", "message_id"}
    assert fields <= set(outcome_fields(CopyResult(Outcome.FAILED, UidKey("g", 1, 1), "x"), "m"))


def test_outputs_name_the_queues_and_the_table(template) -> None:
    outputs = template["Outputs"]
    assert outputs["QueueUrl"]["Value"] == {"Ref": "RefQueue"}
    assert outputs["DeadLetterQueueUrl"]["Value"] == {"Ref": "DeadLetterQueue"}
    assert outputs["StateTableName"]["Value"] == {"Ref": "StateTable"}
    assert outputs["DashboardName"]["Value"] == {"Ref": "Dashboard"}


# -- the deploy role ---------------------------------------------------------------------


class _CfnLoader(yaml.SafeLoader):
    """YAML with CloudFormation's short forms (!Sub, !Ref, ...) read as their long forms."""


def _short_form(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict:
    if isinstance(node, yaml.ScalarNode):
        value: Any = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    if suffix == "GetAtt" and isinstance(value, str):
        value = value.split(".", 1)
    return {"Ref" if suffix == "Ref" else f"Fn::{suffix}": value}


_CfnLoader.add_multi_constructor("!", _short_form)


@pytest.fixture(scope="module")
def deploy_stack() -> dict:
    return yaml.load(DEPLOY_ROLE_TEMPLATE.read_text(), Loader=_CfnLoader)


def _statements(policy_document: dict) -> list[dict]:
    return policy_document["Statement"]


def test_deploy_role_trusts_only_pushes_to_main_of_this_repository(deploy_stack) -> None:
    role = deploy_stack["Resources"]["DeployRole"]["Properties"]
    (trust,) = _statements(role["AssumeRolePolicyDocument"])
    assert trust["Action"] == "sts:AssumeRoleWithWebIdentity"
    assert trust["Condition"] == {
        "StringEquals": {
            "token.actions.githubusercontent.com:aud": "sts.amazonaws.com",
            "token.actions.githubusercontent.com:sub": {
                "Fn::Sub": "repo:${GitHubOrg}/${GitHubRepo}:ref:refs/heads/${DeployBranch}"
            },
        }
    }
    assert deploy_stack["Parameters"]["DeployBranch"]["Default"] == "main"
    assert deploy_stack["Resources"]["GitHubOidcProvider"]["Condition"] == "MakeOidcProvider"


def test_deploy_role_acts_only_on_this_service_and_makes_only_bounded_roles(deploy_stack) -> None:
    role = deploy_stack["Resources"]["DeployRole"]["Properties"]
    (policy,) = role["Policies"]
    actions = set()
    for statement in _statements(policy["PolicyDocument"]):
        resources = statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]]
        statement_actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        actions |= set(statement_actions)
        condition = json.dumps(statement.get("Condition", {}))
        if resources == ["*"]:
            # Actions IAM accepts only on "*": one that acts on no resource, and one whose
            # resource does not exist yet, held to this service's functions by a condition.
            assert statement_actions == ["cloudformation:ValidateTemplate"] or (
                statement_actions == ["lambda:CreateEventSourceMapping"] and "${ServiceName}" in condition
            ), statement
            continue
        for resource in resources:
            arn = resource["Fn::Sub"]
            assert ":${AWS::AccountId}:" in arn or arn.startswith("arn:${AWS::Partition}:s3:::"), arn
            if "${ServiceName}" in arn or "serverless-framework" in arn:
                continue
            # Resources named by a random id (event source mappings) or listed whole (log groups):
            # changed only with a condition naming this service's functions, else only read.
            read_only = all(re.match(r"\w+:(Get|Describe|List)", action) for action in statement_actions)
            assert "${ServiceName}" in condition or read_only, statement
        if {"iam:CreateRole", "iam:PutRolePolicy"} & set(statement_actions):
            assert statement["Condition"] == {"StringEquals": {"iam:PermissionsBoundary": {"Ref": "LambdaBoundary"}}}
    # What would let a deploy escape the boundary or delete the state.
    for forbidden in ("iam:AttachRolePolicy", "iam:DeleteRolePermissionsBoundary", "dynamodb:DeleteTable", "iam:*"):
        assert forbidden not in actions


def test_boundary_allows_everything_the_functions_roles_grant(deploy_stack) -> None:
    boundary = deploy_stack["Resources"]["LambdaBoundary"]["Properties"]["PolicyDocument"]
    allowed = {action for statement in _statements(boundary) for action in statement["Action"]}
    granted = {action for action, _ in PRODUCER_GRANTS | CONSUMER_GRANTS}
    assert granted <= allowed, granted - allowed


# -- workflows -------------------------------------------------------------------------


def test_workflows_pass_actionlint() -> None:
    files = sorted(str(path) for path in WORKFLOWS.glob("*.yml"))
    assert len(files) == 2
    result = subprocess.run([str(BIN / "actionlint"), *files], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_deploy_workflow_assumes_the_role_by_oidc_and_deploys_the_stage_after_the_tests() -> None:
    workflow = yaml.safe_load((WORKFLOWS / "deploy.yml").read_text())
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as true
    assert triggers["push"]["branches"] == ["main"]
    assert workflow["jobs"]["test"]["uses"] == "./.github/workflows/ci.yml"
    deploy = workflow["jobs"]["deploy"]
    assert deploy["needs"] == "test"
    assert deploy["permissions"]["id-token"] == "write"
    (credentials,) = [s for s in deploy["steps"] if s.get("uses", "").startswith("aws-actions/configure-aws-credentials@")]
    assert credentials["with"] == {"role-to-assume": "${{ vars.AWS_ROLE_ARN }}", "aws-region": "${{ vars.AWS_REGION }}"}
    assert deploy["env"]["DEPLOY_ENV"] == "${{ vars.DEPLOY_ENV }}"
    runs = [s.get("run", "") for s in deploy["steps"]]
    deploy_run = next(r for r in runs if "bash infra/osls.sh deploy" in r)
    assert runs.index("make package") < runs.index(deploy_run)
    assert 'deploy --stage "$DEPLOY_ENV" --region "$AWS_REGION"' in deploy_run


# -- the code package ------------------------------------------------------------------


# Lambda's python3.12 runtime: CPython 3.12 on x86_64 Amazon Linux 2023, whose glibc is 2.34.
LAMBDA_PYTHON = (3, 12)
LAMBDA_GLIBC = (2, 34)
# The manylinux tags that predate PEP 600, by the glibc they promise.
LEGACY_MANYLINUX_GLIBC = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}


def _glibc_needed(platform: str) -> tuple[int, int] | None:
    """The glibc a manylinux x86_64 platform tag needs; None for any other platform."""
    match = re.fullmatch(r"(manylinux1|manylinux2010|manylinux2014|manylinux_(\d+)_(\d+))_x86_64", platform)
    if match is None:
        return None
    return LEGACY_MANYLINUX_GLIBC.get(match[1]) or (int(match[2]), int(match[3]))


def _runs_on_cpython_312(python: str, abi: str) -> bool:
    major, minor = LAMBDA_PYTHON
    if abi == "none":  # pure Python, or no Python ABI used: py3, py3N up to py312, cp312
        version = re.fullmatch(rf"py{major}(\d*)", python)
        return python == f"cp{major}{minor}" or bool(version and (not version[1] or int(version[1]) <= minor))
    if abi == "abi3":  # the stable ABI: built for CPython 3.N runs on every later 3.x
        version = re.fullmatch(rf"cp{major}(\d+)", python)
        return bool(version and int(version[1]) <= minor)
    return python == abi == f"cp{major}{minor}"


def fits_lambda(tags: list[str]) -> bool:
    """Whether a wheel with these tags (its WHEEL file's `Tag:` lines, or its file name's
    python-abi-platform, dotted ones too) runs on Lambda's runtime: true when at least one tag
    does, as an installer decides. A wheel is often tagged for several manylinux levels at once
    (charset-normalizer: manylinux_2_5, manylinux1 and manylinux_2_28)."""
    for tag in tags:
        pythons, abis, platforms = (part.split(".") for part in tag.split("-"))
        for python in pythons:
            for abi in abis:
                for platform in platforms:
                    if not _runs_on_cpython_312(python, abi):
                        continue
                    glibc = _glibc_needed(platform)
                    if (platform == "any" and abi == "none") or (glibc is not None and glibc <= LAMBDA_GLIBC):
                        return True
    return False


@pytest.mark.parametrize(
    "tags",
    [
        ["py3-none-any"],
        ["py2.py3-none-any"],
        ["py312-none-any"],
        ["cp312-cp312-manylinux_2_5_x86_64", "cp312-cp312-manylinux1_x86_64", "cp312-cp312-manylinux_2_28_x86_64"],
        ["cp312-cp312-manylinux_2_17_x86_64", "cp312-cp312-manylinux2014_x86_64"],
        ["cp312-cp312-manylinux2010_x86_64"],
        ["cp312-cp312-manylinux_2_34_x86_64"],
        ["cp311-abi3-manylinux_2_34_x86_64"],
        ["cp39-abi3-manylinux_2_28_x86_64"],
        ["py3-none-manylinux_2_17_x86_64"],  # a binary with no Python ABI (ruff's kind)
        ["cp312-cp312-manylinux_2_35_x86_64", "cp312-cp312-manylinux_2_17_x86_64"],  # one tag is enough
    ],
)
def test_a_wheel_fits_lambda_when_one_tag_is_for_cpython_312_on_x86_64_glibc_2_34_or_older(tags) -> None:
    assert fits_lambda(tags)


@pytest.mark.parametrize(
    "tags",
    [
        ["cp312-cp312-manylinux_2_35_x86_64"],  # a newer glibc than Amazon Linux 2023's
        ["cp312-cp312-manylinux_3_0_x86_64"],
        ["cp312-cp312-musllinux_1_2_x86_64"],
        ["cp312-cp312-manylinux_2_17_aarch64", "cp312-cp312-manylinux2014_aarch64"],
        ["cp312-cp312-linux_x86_64"],  # built here, not portable
        ["cp312-cp312-macosx_11_0_arm64"],
        ["cp312-cp312-win_amd64"],
        ["cp311-cp311-manylinux_2_17_x86_64"],
        ["cp313-cp313-manylinux_2_17_x86_64"],
        ["cp313-abi3-manylinux_2_17_x86_64"],  # the stable ABI of a newer Python
        ["cp312-cp312t-manylinux_2_17_x86_64"],  # free-threaded
        ["py2-none-any"],
        ["py313-none-any"],
        ["cp312-abi3-any"],
        [],
    ],
)
def test_a_wheel_does_not_fit_lambda_when_no_tag_is(tags) -> None:
    assert not fits_lambda(tags)


def _locked_runtime_versions() -> dict[str, set[str]]:
    """uv.lock's versions of the runtime dependencies ([project].dependencies and theirs, not the
    test extra's), by normalized name, as they resolve on Lambda's python3.12 on x86_64 Linux."""
    from packaging.markers import Marker  # pytest's own dependency

    lambda_environment = {
        "python_version": "3.12",
        "python_full_version": "3.12.0",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "os_name": "posix",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
    }
    lock = tomllib.loads(LOCK.read_text())
    packages = lock["package"]
    (project,) = [p for p in packages if p["source"].get("editable") == "."]
    versions: dict[str, set[str]] = {}
    seen = set()
    todo = list(project.get("dependencies", []))
    while todo:
        dependency = todo.pop()
        if "marker" in dependency and not Marker(dependency["marker"]).evaluate(lambda_environment):
            continue
        (package,) = [
            p for p in packages
            if p["name"] == dependency["name"] and dependency.get("version", p["version"]) == p["version"]
        ]  # fmt: skip
        versions.setdefault(package["name"], set()).add(package["version"])
        for extra in (None, *dependency.get("extra", [])):
            if (package["name"], package["version"], extra) not in seen:
                seen.add((package["name"], package["version"], extra))
                todo += package.get("optional-dependencies", {}).get(extra, []) if extra else package.get("dependencies", [])
    return versions


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_lambda_package_holds_the_app_and_wheels_for_lambdas_platform_only(lambda_zip: Path) -> None:
    with zipfile.ZipFile(lambda_zip) as archive:
        entries = archive.infolist()
        names = {entry.filename for entry in entries}
        wheel_tags = {
            name.split("/", 1)[0]: [
                line.split(":", 1)[1].strip()
                for line in archive.read(name).decode().splitlines()
                if line.startswith("Tag:")
            ]
            for name in names
            if name.endswith(".dist-info/WHEEL")
        }
    for handler in ("producer/handler.py", "consumer/handler.py", "shared/bootstrap.py", "shared/state/dynamodb.py"):
        assert handler in names
    for dependency in ("boto3/__init__.py", "pydantic/__init__.py", "msal/__init__.py", "imapclient/__init__.py"):
        assert dependency in names
    # Compiled for CPython 3.12 on x86_64 Linux (or the stable ABI), never for the builder's Python.
    extensions = [name for name in names if name.endswith(".so")]
    assert "pydantic_core/_pydantic_core.cpython-312-x86_64-linux-gnu.so" in extensions
    assert all(re.search(r"(\.cpython-312-x86_64-linux-gnu|\.abi3)\.so$", name) for name in extensions), extensions
    # Every distribution came from a wheel, and each wheel has a tag that Lambda's runtime takes.
    dist_infos = {name.split("/", 1)[0] for name in names if ".dist-info/" in name}
    assert dist_infos == set(wheel_tags)
    assert [tags for tags in wheel_tags.values() if not fits_lambda(tags)] == []
    # No tests, dev tools, byte code or console scripts.
    for name in names:
        top = name.split("/", 1)[0]
        assert top not in ("tests", "bench", "infra", ".venv", "bin", "pytest", "moto", "ruff", ".lock"), name
        assert "__pycache__" not in name and not name.endswith(".pyc"), name
    assert sum(entry.file_size for entry in entries) < 250 * 2**20


def test_lambda_package_holds_exactly_the_locked_versions_of_the_runtime_dependencies(lambda_zip: Path) -> None:
    with zipfile.ZipFile(lambda_zip) as archive:
        packaged: dict[str, set[str]] = {}
        for name in archive.namelist():
            if name.endswith(".dist-info/METADATA"):
                metadata = email.message_from_bytes(archive.read(name))
                packaged.setdefault(_normal(metadata["Name"]), set()).add(metadata["Version"])
    locked = _locked_runtime_versions()
    assert {"boto3", "botocore", "pydantic-core", "cryptography", "charset-normalizer"} <= set(locked)
    assert not {"pytest", "moto", "ruff", "cfn-lint"} & set(locked)  # the test extra's stay out
    assert packaged == locked
