"""Deployment files: what cannot run here (Docker, AWS) is still linted and checked for its promises."""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys

import pytest
import yaml
from cfnlint.decode import cfn_yaml

from common import aws
from infra.provision import ProvisionSettings
from tests.conftest import ROOT, settings_env, unique_settings

DEPLOY = ROOT / "deploy"
COMPONENTS = {"collector": "collector", "enrich": "enrich", "lake-loader": "batch.loader", "scorer": "scorer",
              "discount": "discount", "trainer": "batch.train"}
# Each component's settings class and config section: the names its deploy files may set.
SETTINGS = {"collector": ("collector.config", "CollectorSettings", "collector"),
            "enrich": ("enrich.config", "EnrichSettings", "enrich"),
            "lake-loader": ("batch.loader", "LoaderSettings", "lake"),
            "scorer": ("scorer.config", "ScorerSettings", "scorer"),
            "discount": ("discount.settings", "DiscountSettings", "discount"),
            "trainer": ("batch.train_config", "TrainSettings", "train")}
COMPOSE_FILES = [DEPLOY / "docker-compose.yml", ROOT / "localstack" / "docker-compose.yml"]


def test_cloudformation_template_passes_cfn_lint():
    # The cfn-lint command, run through this interpreter so it is the pinned version of the venv.
    lint = "import sys; from cfnlint.runner import main; sys.argv[0] = 'cfn-lint'; sys.exit(main())"
    result = subprocess.run([sys.executable, "-c", lint, str(DEPLOY / "cloudformation.yaml")],
                            capture_output=True, text=True, timeout=120, check=False)
    # cfn-lint's exit code is a bit mask: 2 errors, 4 warnings, 8 informational. We keep it clean.
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def template() -> dict:
    return cfn_yaml.load(str(DEPLOY / "cloudformation.yaml"))


def resources(template: dict, kind: str) -> dict[str, dict]:
    return {name: r for name, r in template["Resources"].items() if r["Type"] == kind}


def test_roles_that_read_models_may_list_the_bucket_so_a_missing_current_is_404_not_403(template):
    readers = 0
    for role in resources(template, "AWS::IAM::Role").values():
        statements = [st for policy in role["Properties"].get("Policies", [])
                      for st in policy["PolicyDocument"]["Statement"]]
        gets = [st for st in statements if "s3:GetObject" in json.dumps(st["Action"]) and "models/" in json.dumps(st)]
        if gets:
            readers += 1
            assert any(st["Action"] == "s3:ListBucket" and "Condition" not in st for st in statements), role
    assert readers == 2                                                  # the scorer and the trainer


def test_template_has_every_resource_the_pipeline_needs(template):
    streams = resources(template, "AWS::Kinesis::Stream")
    assert {s["Properties"]["Name"]["Fn::Sub"] for s in streams.values()} == {
        "${Prefix}-raw", "${Prefix}-enriched", "${Prefix}-bad", "${Prefix}-predictions"}
    bucket = next(iter(resources(template, "AWS::S3::Bucket").values()))["Properties"]
    prefixes = {rule.get("Prefix") for rule in bucket["LifecycleConfiguration"]["Rules"]}
    assert {"enriched/", "bad/", "raw/"} <= prefixes
    tables = resources(template, "AWS::DynamoDB::Table")
    ttl = {name for name, t in tables.items() if t["Properties"].get("TimeToLiveSpecification", {}).get("Enabled")}
    assert ttl == {"PredictionsTable", "OffersTable"} and "LeaseTable" in tables
    families = {t["Properties"]["Family"]["Fn::Sub"].split("-", 1)[1]
                for t in resources(template, "AWS::ECS::TaskDefinition").values()}
    assert families == set(COMPONENTS)
    services = {s["Properties"]["ServiceName"] for s in resources(template, "AWS::ECS::Service").values()}
    assert services == set(COMPONENTS) - {"trainer"}
    for task in resources(template, "AWS::ECS::TaskDefinition").values():
        container = task["Properties"]["ContainerDefinitions"][0]
        assert task["Properties"]["RequiresCompatibilities"] == ["FARGATE"]
        assert container["User"] != "0" and container["Command"][:2] == ["python", "-m"]
    rule = next(iter(resources(template, "AWS::Events::Rule").values()))["Properties"]
    assert rule["Targets"][0]["EcsParameters"]["TaskDefinitionArn"] == {"Ref": "TrainerTaskDefinition"}


def _statements(role: dict) -> list[dict]:
    return [s for policy in role["Properties"].get("Policies", []) for s in policy["PolicyDocument"]["Statement"]]


def test_each_component_role_is_least_privilege(template):
    roles = resources(template, "AWS::IAM::Role")
    task_roles = {name: role for name, role in roles.items() if name.endswith("TaskRole")}
    assert len(task_roles) == len(COMPONENTS)
    for name, role in task_roles.items():
        for statement in _statements(role):
            actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
            assert all("*" not in action for action in actions), (name, actions)
            assert statement["Resource"] != "*", name
    # Spot checks: the collector cannot read anything, the discount engine cannot touch the lake.
    collector = json.dumps(_statements(task_roles["CollectorTaskRole"]))
    assert "GetRecords" not in collector and "LakeBucket" not in collector and "dynamodb" not in collector
    discount = json.dumps(_statements(task_roles["DiscountTaskRole"]))
    assert "LakeBucket" not in discount and "RawStream" not in discount and "OffersTable" in discount


def dockerfile(component: str) -> str:
    return (DEPLOY / component / "Dockerfile").read_text()


@pytest.mark.parametrize("component", sorted(COMPONENTS))
def test_dockerfile_is_small_non_root_with_a_healthcheck(component):
    text = dockerfile(component)
    assert re.search(r"^FROM python:3\.11-slim", text, re.MULTILINE)
    users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert users and users[-1] not in ("root", "0", "0:0"), users
    assert re.search(r"^HEALTHCHECK\s+.*CMD", text, re.MULTILINE | re.DOTALL)
    assert f'CMD ["python", "-m", "{COMPONENTS[component]}"]' in text
    for source in re.findall(r"^COPY (?:--chown=\S+ )?(\S+) ", text, re.MULTILINE):
        assert (ROOT / source).exists(), f"{component} copies {source}, which is not in the repository"
    ignore = (DEPLOY / component / "Dockerfile.dockerignore").read_text().splitlines()
    assert "*" in ignore and "!common/" in ignore


def deployed_variables(component: str, template: dict) -> set[str]:
    """The CLICKSTREAM_* variables the Dockerfile, the compose service and the ECS task set."""
    names = set(re.findall(r"\b(CLICKSTREAM_[A-Z0-9_]+)=", dockerfile(component)))
    service = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"][component]
    names |= set(service.get("environment") or {})
    for task in resources(template, "AWS::ECS::TaskDefinition").values():
        for container in task["Properties"]["ContainerDefinitions"]:
            if container["Name"] == component:
                names |= {variable["Name"] for variable in container.get("Environment", [])}
    return {name for name in names if name.startswith("CLICKSTREAM_")}


@pytest.mark.parametrize("component", sorted(COMPONENTS))
def test_every_variable_the_deploy_files_set_is_a_setting_of_that_component(component, template):
    module, name, section = SETTINGS[component]
    fields = [field.name.upper() for field in dataclasses.fields(getattr(importlib.import_module(module), name))]
    known = {"CLICKSTREAM_CONFIG"} | {f"CLICKSTREAM_{field}" for field in fields} \
        | {f"CLICKSTREAM_{section.upper()}_{field}" for field in fields}
    unknown = deployed_variables(component, template) - known
    assert not unknown, f"{component}: {sorted(unknown)} are no settings of {name}; it would ignore them"


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_compose_file_parses_and_every_service_has_a_healthcheck(path):
    compose = yaml.safe_load(path.read_text())
    assert compose["services"]
    for name, service in compose["services"].items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
        image = service.get("image", "")
        if "build" not in service:
            assert re.search(r":v?\d[\w.]*$", image), f"{name}: image {image!r} is not pinned to a version"
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond this machine"
        if "build" in service:
            assert (path.parent / service["build"]["context"] / service["build"]["dockerfile"]).exists()
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (path.parent / source).exists(), f"{name} mounts missing {source}"


def test_full_compose_runs_every_component_against_localstack():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(COMPONENTS) <= set(services)
    for component in COMPONENTS:
        assert services[component]["environment"]["AWS_ENDPOINT_URL"] == "http://localstack:4566"
    assert "LOCALSTACK_AUTH_TOKEN" in services["localstack"]["environment"]


def test_grafana_dashboard_covers_the_operator_metrics():
    dashboard = json.loads((DEPLOY / "grafana" / "clickstream.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
    for metric in ("collector_requests_total", "collector_records_produced_total", "collector_spool_depth_records",
                   "enrich_events_total", "enrich_bad_rows_total", "_lag_ms", "scorer_scoring_seconds_bucket", "scorer_model_info",
                   "discount_offers_total"):
        assert metric in exprs, metric
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert {job["job_name"] for job in scrape["scrape_configs"]} == set(COMPONENTS) - {"trainer"}


def test_operations_doc_has_a_nightly_cron_entry_for_make_train():
    text = (ROOT / "docs" / "operations.md").read_text()
    assert re.search(r"^\s*(\S+\s+){5}.*make train", text, re.MULTILINE)


def test_localstack_ready_hook_provisions_through_infra_provision(aws_endpoint, tmp_path):
    settings = unique_settings(ProvisionSettings)
    hook = ROOT / "localstack" / "init" / "ready.d" / "provision.sh"
    assert os.access(hook, os.X_OK), "LocalStack runs only executable hooks"
    env = {**os.environ, **settings_env(settings), "CLICKSTREAM_CODE_DIR": str(ROOT),
           "CLICKSTREAM_PYTHON": sys.executable, "AWS_ENDPOINT_URL": aws_endpoint}
    result = subprocess.run(["bash", str(hook)], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    names = aws.client("kinesis").list_streams(Limit=1000)["StreamNames"]
    assert {settings.raw_stream, settings.enriched_stream, settings.bad_stream, settings.predictions_stream} <= set(names)
    assert aws.client("dynamodb").describe_table(TableName=settings.offers_table)["Table"]["TableStatus"] == "ACTIVE"
