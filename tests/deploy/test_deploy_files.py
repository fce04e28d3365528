"""Deployment files: what cannot run here (Docker, AWS) is still linted and checked for its promises."""
from __future__ import annotations

import dataclasses
import http.server
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import uuid
from pathlib import Path, PurePosixPath

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
            "trainer": ("batch.train_config", "TrainSettings", "train"),
            "compactor": ("batch.loader", "LoaderSettings", "lake"),
            "skew": ("batch.train_config", "TrainSettings", "train"),
            "uplift": ("discount.settings", "DiscountSettings", "discount")}
# Scheduled tasks that run a component's image with another command: task (ECS container, compose
# service) -> (the component whose image it runs, the module it runs). The compactor reads the lake
# as the lake loader does; the skew check needs training's code; the uplift task reads the discount
# engine's offers.
SCHEDULED = {"compactor": ("lake-loader", "batch.cli"), "skew": ("trainer", "batch.skew"),
             "uplift": ("discount", "discount.uplift")}
TASKS = sorted([*COMPONENTS, *SCHEDULED])         # every ECS task definition and compose service of ours
COMPOSE_FILES = [DEPLOY / "docker-compose.yml", ROOT / "localstack" / "docker-compose.yml"]


def test_images_are_named_by_a_tag_that_does_not_move(template):
    # With ImageTag defaulting to latest, each replaced or nightly task pulled whatever latest was.
    assert "Default" not in template["Parameters"]["ImageTag"]
    [assertion] = template["Rules"]["ImageTagDoesNotMove"]["Assertions"]
    assert assertion["Assert"] == {"Fn::Not": [{"Fn::Equals": [{"Ref": "ImageTag"}, "latest"]}]}


def test_cloudformation_template_passes_cfn_lint():
    # The cfn-lint command, run through this interpreter so it is the pinned version of the venv.
    lint = "import sys; from cfnlint.runner import main; sys.argv[0] = 'cfn-lint'; sys.exit(main())"
    result = subprocess.run([sys.executable, "-c", lint, str(DEPLOY / "cloudformation.yaml")],
                            capture_output=True, encoding="utf-8", timeout=120, check=False)
    # cfn-lint's exit code is a bit mask: 2 errors, 4 warnings, 8 informational. We keep it clean.
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def template() -> dict:
    return cfn_yaml.load(str(DEPLOY / "cloudformation.yaml"))


def resources(template: dict, kind: str) -> dict[str, dict]:
    return {name: r for name, r in template["Resources"].items() if r["Type"] == kind}


def schedules(template: dict) -> dict[str, dict]:
    """The EventBridge rules that start a task on a schedule: task definition -> the rule's properties."""
    return {target["EcsParameters"]["TaskDefinitionArn"]["Ref"]: rule["Properties"]
            for rule in resources(template, "AWS::Events::Rule").values() if "ScheduleExpression" in rule["Properties"]
            for target in rule["Properties"]["Targets"]}


def test_roles_that_read_models_may_list_the_bucket_so_a_missing_current_is_404_not_403(template):
    readers = 0
    for role in resources(template, "AWS::IAM::Role").values():
        statements = [st for policy in role["Properties"].get("Policies", [])
                      for st in policy["PolicyDocument"]["Statement"]]
        gets = [st for st in statements if "s3:GetObject" in json.dumps(st["Action"]) and "models/" in json.dumps(st)]
        if gets:
            readers += 1
            assert any(st["Action"] == "s3:ListBucket" and "Condition" not in st for st in statements), role
    assert readers == 3                                                  # the scorer, the trainer, the skew check


def test_template_has_every_resource_the_pipeline_needs(template):
    streams = resources(template, "AWS::Kinesis::Stream")
    assert {s["Properties"]["Name"]["Fn::Sub"] for s in streams.values()} == {
        "${Prefix}-raw", "${Prefix}-enriched", "${Prefix}-bad", "${Prefix}-predictions"}
    bucket = next(iter(resources(template, "AWS::S3::Bucket").values()))["Properties"]
    prefixes = {rule.get("Prefix") for rule in bucket["LifecycleConfiguration"]["Rules"]}
    assert {"enriched/", "bad/", "raw/"} <= prefixes
    # Versioned as infra.provision makes it: deleted files restorable, clear personal data for a day only.
    assert bucket["VersioningConfiguration"] == {"Status": "Enabled"}
    kept = {rule.get("Prefix", ""): rule["NoncurrentVersionExpiration"]["NoncurrentDays"]
            for rule in bucket["LifecycleConfiguration"]["Rules"] if "NoncurrentVersionExpiration" in rule}
    assert kept == {"": {"Ref": "DeletedRetentionDays"}, "raw/": 1, "bad/": 1}
    tables = resources(template, "AWS::DynamoDB::Table")
    ttl = {name for name, t in tables.items() if t["Properties"].get("TimeToLiveSpecification", {}).get("Enabled")}
    assert ttl == {"PredictionsTable", "OffersTable", "LeaseTable"}    # the lease table's for dead workers' rows
    families = {t["Properties"]["Family"]["Fn::Sub"].split("-", 1)[1]
                for t in resources(template, "AWS::ECS::TaskDefinition").values()}
    assert families == set(TASKS)
    services = {s["Properties"]["ServiceName"] for s in resources(template, "AWS::ECS::Service").values()}
    assert services == set(COMPONENTS) - {"trainer"}
    for task in resources(template, "AWS::ECS::TaskDefinition").values():
        container = task["Properties"]["ContainerDefinitions"][0]
        assert task["Properties"]["RequiresCompatibilities"] == ["FARGATE"]
        assert container["User"] != "0" and container["Command"][:2] == ["python", "-m"]
    assert sorted(schedules(template)) == ["CompactorTaskDefinition", "SkewTaskDefinition", "TrainerTaskDefinition",
                                           "UpliftTaskDefinition"]


def test_the_longest_prefix_the_template_allows_still_makes_a_valid_bucket_name(template):
    """S3 names are at most 63 characters: a 31-character prefix failed the stack in 14-character regions."""
    longest = int(re.fullmatch(r"\^\[a-z\]\[a-z0-9-\]\{1,(\d+)\}\$",
                               template["Parameters"]["Prefix"]["AllowedPattern"]).group(1)) + 1
    bucket = next(iter(resources(template, "AWS::S3::Bucket").values()))["Properties"]["BucketName"]["Fn::Sub"]
    name = bucket.replace("${Prefix}", "p" * longest).replace("${AWS::AccountId}", "1" * 12) \
        .replace("${AWS::Region}", "us-isof-south-1")     # the longest region name (15 characters)
    assert len(name) <= 63, name


def test_prometheus_can_reach_every_port_a_task_serves(template):
    """Each service's task serves /metrics on its container port; the security groups let in only
    what they list, so a port missing from them is a component nobody can scrape."""
    services = resources(template, "AWS::ECS::Service")
    assert len(services) == 5
    for name, service in services.items():
        task = template["Resources"][service["Properties"]["TaskDefinition"]["Ref"]]
        ports = {mapping["ContainerPort"] for container in task["Properties"]["ContainerDefinitions"]
                 for mapping in container.get("PortMappings", [])}
        groups = service["Properties"]["NetworkConfiguration"]["AwsvpcConfiguration"]["SecurityGroups"]
        rules = [rule for group in groups
                 for rule in template["Resources"][group["Ref"]]["Properties"].get("SecurityGroupIngress", [])
                 if rule.get("CidrIp") == {"Ref": "MonitoringCidr"}]
        unreachable = {port for port in ports if not any(r["FromPort"] <= port <= r["ToPort"] for r in rules)}
        assert ports and not unreachable, f"{name}: ports {sorted(unreachable)} closed to MonitoringCidr"


def _statements(role: dict) -> list[dict]:
    return [s for policy in role["Properties"].get("Policies", []) for s in policy["PolicyDocument"]["Statement"]]


def test_each_component_role_is_least_privilege(template):
    roles = resources(template, "AWS::IAM::Role")
    task_roles = {name: role for name, role in roles.items() if name.endswith("TaskRole")}
    assert len(task_roles) == len(TASKS)
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
    # The compactor rewrites enriched/ only: no models, no stream records, no lease writes.
    compactor = _statements(task_roles["CompactorTaskRole"])
    text = json.dumps(compactor)
    assert "models/" not in text and "bad/" not in text and "GetRecords" not in text and "PutRecord" not in text
    assert not {"RawStream", "BadStream", "PredictionsStream", "PredictionsTable", "OffersTable"} & set(re.findall(r"\w+", text))
    assert {action for st in compactor for action in ([st["Action"]] if isinstance(st["Action"], str) else st["Action"])
            if action.startswith(("dynamodb:", "kinesis:"))} == {"dynamodb:Query", "kinesis:ListShards"}
    writes = [st for st in compactor if {"s3:PutObject", "s3:DeleteObject"} & set(st["Action"])]
    assert [st["Resource"] for st in writes] == [[{"Fn::Sub": "${LakeBucket.Arn}/enriched/*"},
                                                  {"Fn::Sub": "${LakeBucket.Arn}/locks/lake-rewrite.json"}]]


def test_each_schedule_may_start_its_own_task_only(template):
    """EventBridge's role for a rule runs that rule's task definition in the cluster and passes its roles, nothing else."""
    for name, rule in resources(template, "AWS::Events::Rule").items():
        if "ScheduleExpression" not in rule["Properties"]:
            continue                # ScheduledTaskFailedRule: it starts nothing
        [target] = rule["Properties"]["Targets"]
        task = template["Resources"][target["EcsParameters"]["TaskDefinitionArn"]["Ref"]]["Properties"]
        role = template["Resources"][target["RoleArn"]["Fn::GetAtt"][0]]
        statements = _statements(role)
        assert {st["Action"] for st in statements} == {"ecs:RunTask", "iam:PassRole"}, name
        [run] = [st for st in statements if st["Action"] == "ecs:RunTask"]
        assert run["Resource"]["Fn::Sub"].endswith(f':task-definition/{task["Family"]["Fn::Sub"]}:*'), name
        assert run["Condition"] == {"ArnEquals": {"ecs:cluster": {"Fn::GetAtt": ["Cluster", "Arn"]}}}
        assert target["Arn"] == {"Fn::GetAtt": ["Cluster", "Arn"]}
        [passes] = [st for st in statements if st["Action"] == "iam:PassRole"]
        assert sorted(map(json.dumps, passes["Resource"])) == sorted(map(json.dumps, [task["TaskRoleArn"],
                                                                                      task["ExecutionRoleArn"]])), name


def _cron_minutes(expression: str) -> int:
    """Minutes past midnight (UTC) of a daily EventBridge cron(M H * * ? *)."""
    minute, hour = re.fullmatch(r"cron\((\d+) (\d+) \* \* \? \*\)", expression).groups()
    return 60 * int(hour) + int(minute)


def test_the_compactor_runs_nightly_before_training_on_the_loaders_lake(template):
    from batch.cli import lake_cli

    rules = schedules(template)
    parameters = template["Parameters"]
    compaction = parameters[rules["CompactorTaskDefinition"]["ScheduleExpression"]["Ref"]]["Default"]
    training = parameters[rules["TrainerTaskDefinition"]["ScheduleExpression"]["Ref"]]["Default"]
    assert _cron_minutes(compaction) < _cron_minutes(training), (compaction, training)
    # The lake loader's image and a relative range (no shell on ECS for $(date …)), the same in compose.
    task = template["Resources"]["CompactorTaskDefinition"]["Properties"]
    assert task["TaskRoleArn"] == {"Fn::GetAtt": ["CompactorTaskRole", "Arn"]}
    compactor = container(template, "compactor")
    assert compactor["Image"] == container(template, "lake-loader")["Image"] == {
        "Fn::Sub": "${ImageRepository}/clickstream-lake-loader:${ImageTag}"}
    command = compactor["Command"]
    assert command[:5] == ["python", "-m", "batch.cli", "compact", "--last-days"] and command[6:] == ["--no-progress"]
    assert int(command[5]) >= 1, command
    lake_cli.commands["compact"].make_context("compact", command[4:])      # options the command takes
    service = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text(encoding="utf-8"))["services"]["compactor"]
    assert service["command"] == command and "profiles" in service          # run on demand, not by `up`
    assert service["build"]["dockerfile"] == "deploy/lake-loader/Dockerfile"
    # The loader's bucket and lease group (<lake_app>#<enriched_stream>): what it may still rewrite.
    for field in ("region", "bucket", "enriched_stream", "lease_table", "lake_app"):
        assert effective_setting("compactor", field, template) == effective_setting("lake-loader", field, template), field


def test_the_uplift_task_records_hourly_on_the_engines_tables_and_writes_only_its_records(template):
    from discount.uplift import main as uplift

    rules = schedules(template)
    schedule = template["Parameters"][rules["UpliftTaskDefinition"]["ScheduleExpression"]["Ref"]]["Default"]
    assert re.fullmatch(r"cron\(\d+ \* \* \* \? \*\)", schedule), schedule    # hourly: the rows live a day
    task = container(template, "uplift")
    assert task["Image"] == container(template, "discount")["Image"]
    assert task["Command"] == ["python", "-m", "discount.uplift", "--record"]
    uplift.make_context("uplift", task["Command"][3:])                      # options the command takes
    service = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text(encoding="utf-8"))["services"]["uplift"]
    assert service["command"] == task["Command"] and "profiles" in service
    # The engine's offers, marks and TTL: which hours' rows are all still in the table.
    for field in ("offers_table", "predictions_table", "offer_ttl_hours"):
        assert effective_setting("uplift", field, template) == effective_setting("discount", field, template), field
    statements = _statements(resources(template, "AWS::IAM::Role")["UpliftTaskRole"])
    writes = [st for st in statements if any(action.startswith(("s3:Put", "dynamodb:Put", "dynamodb:Update"))
                                             for action in ([st["Action"]] if isinstance(st["Action"], str) else st["Action"]))]
    assert [st["Resource"] for st in writes] == [{"Fn::Sub": "${LakeBucket.Arn}/reports/uplift/*"}]


def not_installed(image_of: str, module: str) -> dict[str, list[str]]:
    """The third-party modules ``python -m module`` imports that the Dockerfile of ``image_of`` does not
    install, with the distributions that would provide them."""
    from importlib import metadata

    from tests.deploy.test_image_packages import installed_closure, third_party_imports

    providers = metadata.packages_distributions()
    installed = installed_closure(dockerfile(image_of))
    return {name: providers.get(name, ["?"]) for name in third_party_imports(module)
            if not installed & {re.sub(r"[-_.]+", "-", d).lower() for d in providers.get(name, [])}}


def test_the_compactors_image_installs_what_its_command_imports():
    for task, (component, module) in SCHEDULED.items():
        missing = not_installed(task, module)
        assert not missing, f"deploy/{component}/Dockerfile does not install what {module} imports: {missing}"


@pytest.mark.parametrize("module", ["batch.registry", "batch.skew"])
def test_the_trainer_image_installs_what_the_tools_run_beside_training_import(module):
    """docs/operations.md runs these where make train runs: the registry's moves, the skew check."""
    missing = not_installed("trainer", module)
    assert not missing, f"deploy/trainer/Dockerfile does not install what {module} imports: {missing}"


def test_the_skew_check_runs_daily_reading_all_three_kinds_of_prediction_and_writing_nothing(template):
    from batch.skew import main as skew

    statements = _statements(resources(template, "AWS::IAM::Role")["SkewTaskRole"])
    actions = {action for st in statements for action in ([st["Action"]] if isinstance(st["Action"], str) else st["Action"])}
    assert actions == {"s3:GetObject", "s3:ListBucket", "dynamodb:Scan", "kinesis:DescribeStreamSummary",
                       "kinesis:ListShards", "kinesis:GetShardIterator", "kinesis:GetRecords"}
    [scan] = [st for st in statements if st["Action"] == "dynamodb:Scan"]
    assert scan["Resource"] == [{"Fn::GetAtt": ["PredictionsTable", "Arn"]}, {"Fn::GetAtt": ["OffersTable", "Arn"]}]
    [read] = [st for st in statements if "kinesis:GetRecords" in st["Action"]]
    assert read["Resource"] == {"Fn::GetAtt": ["PredictionsStream", "Arn"]}
    assert "dynamodb" not in json.dumps(_statements(resources(template, "AWS::IAM::Role")["TrainerTaskRole"]))
    task = container(template, "skew")
    assert task["Image"] == container(template, "trainer")["Image"]
    assert task["Command"] == ["python", "-m", "batch.skew", "--rows", "all", "--no-progress"]
    skew.make_context("skew", task["Command"][3:])                          # options the command takes
    service = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text(encoding="utf-8"))["services"]["skew"]
    assert service["command"] == task["Command"] and "profiles" in service
    schedule = template["Parameters"][schedules(template)["SkewTaskDefinition"]["ScheduleExpression"]["Ref"]]["Default"]
    assert _cron_minutes(schedule) >= 0                                     # daily
    # Training's lake and sessions (the tables: test_every_task_names_each_stream_table_and_bucket_its_role_may_use).
    for field in ("bucket", "session_gap_minutes"):
        assert effective_setting("skew", field, template) == effective_setting("trainer", field, template), field


# The stack's named resources and the setting that names each (AwsSettings): a task whose role may
# use one but whose environment does not name it uses the default name, another stack's or none.
RESOURCE_SETTINGS = {"RawStream": "raw_stream", "EnrichedStream": "enriched_stream", "BadStream": "bad_stream",
                     "PredictionsStream": "predictions_stream", "LakeBucket": "bucket", "LeaseTable": "lease_table",
                     "PredictionsTable": "predictions_table", "OffersTable": "offers_table"}


def test_every_task_names_each_stream_table_and_bucket_its_role_may_use(template):
    roles = resources(template, "AWS::IAM::Role")
    for name, task in resources(template, "AWS::ECS::TaskDefinition").items():
        role = task["Properties"]["TaskRoleArn"]["Fn::GetAtt"][0]
        used = set(re.findall(r"\b(" + "|".join(RESOURCE_SETTINGS) + r")\b", json.dumps(_statements(roles[role]))))
        assert used, name
        [container] = task["Properties"]["ContainerDefinitions"]
        named = {variable["Name"] for variable in container["Environment"] if variable["Value"] in
                 [{"Ref": resource} for resource in used]}
        assert named == {f"CLICKSTREAM_{RESOURCE_SETTINGS[resource].upper()}" for resource in used}, name


def test_the_scorer_may_mark_purchases_and_the_discount_engine_may_check_them_on_the_stacks_table(template):
    """A purchase marks its session's row in the predictions table; an offer's transaction checks it."""
    roles = resources(template, "AWS::IAM::Role")
    table = {"Fn::GetAtt": ["PredictionsTable", "Arn"]}

    def actions(role: str) -> set[str]:
        return {action for st in _statements(roles[role]) if st["Resource"] == table
                for action in ([st["Action"]] if isinstance(st["Action"], str) else st["Action"])}

    assert "dynamodb:UpdateItem" in actions("ScorerTaskRole")
    assert actions("DiscountTaskRole") == {"dynamodb:GetItem", "dynamodb:ConditionCheckItem"}
    [container] = template["Resources"]["DiscountTaskDefinition"]["Properties"]["ContainerDefinitions"]
    assert {"Name": "CLICKSTREAM_PREDICTIONS_TABLE", "Value": {"Ref": "PredictionsTable"}} in container["Environment"]


def dockerfile(component: str) -> str:
    """The Dockerfile of a component's image (a scheduled task's: the component's whose image it runs)."""
    image = SCHEDULED[component][0] if component in SCHEDULED else component
    return (DEPLOY / image / "Dockerfile").read_text(encoding="utf-8")


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
    ignore = (DEPLOY / component / "Dockerfile.dockerignore").read_text(encoding="utf-8").splitlines()
    assert "*" in ignore and "!common/" in ignore


def deployed_variables(component: str, template: dict) -> set[str]:
    """The CLICKSTREAM_* variables the Dockerfile, the compose service and the ECS task set."""
    names = set(re.findall(r"\b(CLICKSTREAM_[A-Z0-9_]+)=", dockerfile(component)))
    service = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text(encoding="utf-8"))["services"][component]
    names |= set(service.get("environment") or {})
    for task in resources(template, "AWS::ECS::TaskDefinition").values():
        for container in task["Properties"]["ContainerDefinitions"]:
            if container["Name"] == component:
                names |= {variable["Name"] for variable in container.get("Environment", [])}
    return {name for name in names if name.startswith("CLICKSTREAM_")}


@pytest.mark.parametrize("component", TASKS)
def test_the_compose_file_sets_no_setting_to_its_default(component):
    """A variable beats the TOML file: one repeating the default made a config file's value for that
    key do nothing, with no word said."""
    module, name, _ = SETTINGS[component]
    defaults = {f"CLICKSTREAM_{field.name.upper()}": field.default
                for field in dataclasses.fields(getattr(importlib.import_module(module), name))}
    service = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text(encoding="utf-8"))["services"][component]
    same = {key: value for key, value in (service.get("environment") or {}).items()
            if key in defaults and str(value) == str(defaults[key])}
    assert not same


@pytest.mark.parametrize("component", TASKS)
def test_every_variable_the_deploy_files_set_is_a_setting_of_that_component(component, template):
    module, name, section = SETTINGS[component]
    fields = [field.name.upper() for field in dataclasses.fields(getattr(importlib.import_module(module), name))]
    known = {"CLICKSTREAM_CONFIG"} | {f"CLICKSTREAM_{field}" for field in fields} \
        | {f"CLICKSTREAM_{section.upper()}_{field}" for field in fields}
    unknown = deployed_variables(component, template) - known
    assert not unknown, f"{component}: {sorted(unknown)} are no settings of {name}; it would ignore them"


def test_every_component_runs_under_an_init_process(template):
    """Python as PID 1 drops a SIGTERM sent before it installs its handler: a scorer stopped while it
    loaded its model took its shards and ran on until it was killed at the stop timeout."""
    services = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text(encoding="utf-8"))["services"]
    assert all(services[component].get("init") is True for component in TASKS)
    containers = [container for task in resources(template, "AWS::ECS::TaskDefinition").values()
                  for container in task["Properties"]["ContainerDefinitions"]]
    assert {container["Name"] for container in containers} == set(TASKS)
    assert all(container["LinuxParameters"]["InitProcessEnabled"] is True for container in containers)


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_compose_file_parses_and_every_service_has_a_healthcheck(path):
    compose = yaml.safe_load(path.read_text(encoding="utf-8"))
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


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: str(p.relative_to(ROOT)))
@pytest.mark.parametrize("answer, healthy", [
    ({"completed": True, "scripts": [{"stage": "READY", "name": "provision.sh", "state": "SUCCESSFUL"}]}, True),
    ({"completed": True, "scripts": [{"stage": "READY", "name": "provision.sh", "state": "ERROR"}]}, False),
    ({"completed": False, "scripts": [{"stage": "READY", "name": "provision.sh", "state": "RUNNING"}]}, False),
])
def test_localstack_is_healthy_only_once_provisioning_succeeded(path, answer, healthy):
    """LocalStack calls its READY stage completed even when a hook failed: the components would start
    against streams that were never made and restart in a loop."""
    check = yaml.safe_load(path.read_text(encoding="utf-8"))["services"]["localstack"]["healthcheck"]["test"][1]

    class InitStage(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps(answer).encode() if self.path == "/_localstack/init/ready" else b"{}"
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), InitStage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        # Compose writes a shell's $ as $$; the container's port 4566 is this server's.
        command = check.replace("$$", "$").replace("localhost:4566", f"127.0.0.1:{server.server_address[1]}")
        result = subprocess.run(["sh", "-c", command], capture_output=True, timeout=30, check=False)
    finally:
        server.shutdown()
    assert (result.returncode == 0) == healthy, result


def test_full_compose_runs_every_component_against_localstack():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text(encoding="utf-8"))
    services = compose["services"]
    assert set(TASKS) <= set(services)
    for component in TASKS:
        assert services[component]["environment"]["AWS_ENDPOINT_URL"] == "http://localstack:4566"
    assert "LOCALSTACK_AUTH_TOKEN" in services["localstack"]["environment"]


def test_grafana_dashboard_covers_the_operator_metrics():
    dashboard = json.loads((DEPLOY / "grafana" / "clickstream.json").read_text(encoding="utf-8"))
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
    for metric in ("collector_requests_total", "collector_records_produced_total", "collector_spool_depth_records",
                   "collector_hits_keyed_total", "enrich_events_total", "enrich_bad_rows_total", "_lag_ms", "scorer_scoring_seconds_bucket", "scorer_model_info",
                   "scorer_score_psi", "discount_offers_total", "discount_prediction_age_seconds_bucket"):
        assert metric in exprs, metric
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text(encoding="utf-8"))
    assert {job["job_name"] for job in scrape["scrape_configs"]} == set(COMPONENTS) - {"trainer"}


def test_operations_doc_has_a_nightly_cron_entry_for_make_train():
    text = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    assert re.search(r"^\s*(\S+\s+){5}.*make train", text, re.MULTILINE)


def test_localstack_ready_hook_provisions_through_infra_provision(aws_endpoint, tmp_path):
    settings = unique_settings(ProvisionSettings)
    hook = ROOT / "localstack" / "init" / "ready.d" / "provision.sh"
    assert os.access(hook, os.X_OK), "LocalStack runs only executable hooks"
    env = {**os.environ, **settings_env(settings), "CLICKSTREAM_CODE_DIR": str(ROOT),
           "CLICKSTREAM_PYTHON": sys.executable, "AWS_ENDPOINT_URL": aws_endpoint}
    result = subprocess.run(["bash", str(hook)], env=env, capture_output=True, encoding="utf-8", timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    names = aws.client("kinesis").list_streams(Limit=1000)["StreamNames"]
    assert {settings.raw_stream, settings.enriched_stream, settings.bad_stream, settings.predictions_stream} <= set(names)
    assert aws.client("dynamodb").describe_table(TableName=settings.offers_table)["Table"]["TableStatus"] == "ACTIVE"


# ----------------------------------------------------------------------------- what the images write

def dockerfile_env(text: str) -> dict[str, str]:
    """The variables a Dockerfile's ENV lines set (values without spaces or quotes, as ours are)."""
    text = text.replace("\\\n", " ")
    env = {}
    for line in re.findall(r"^ENV\s+(.*)$", text, re.MULTILINE):
        env.update(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=(\S+)", line))
    return env


def _run_commands(text: str) -> list[list[str]]:
    """Every shell command of a Dockerfile's RUN lines, split into words."""
    text = text.replace("\\\n", " ")
    return [command.split() for run in re.findall(r"^RUN\s+(.*)$", text, re.MULTILINE)
            for command in re.split(r"&&|;", run) if command.split()]


def _ownership(text: str) -> tuple[set[PurePosixPath], set[PurePosixPath]]:
    """The folders a Dockerfile chowns to its last USER, and every folder its mkdirs create."""
    user = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)[-1]
    owned, made = set(), set()
    for words in _run_commands(text):
        arguments = [word for word in words[1:] if not word.startswith("-")]
        if words[0] == "chown" and arguments and arguments[0].split(":")[0] == user:
            owned |= {PurePosixPath(argument) for argument in arguments[1:]}
        elif words[0] == "mkdir":
            for argument in map(PurePosixPath, arguments):
                made |= {argument, *argument.parents}
    return owned, made


def writable_by_the_image_user(text: str, path: PurePosixPath) -> bool:
    """Whether the image's last USER can create ``path``: /tmp, or a folder at or above it is chowned to
    that user and so is every folder the Dockerfile creates between that one and ``path`` (``mkdir -p``
    makes root-owned parents)."""
    owned, made = _ownership(text)
    if path == PurePosixPath("/tmp") or PurePosixPath("/tmp") in path.parents:
        return True
    for top in (folder for folder in owned if folder == path or folder in path.parents):
        between = {folder for folder in made if (folder == path or folder in path.parents) and top in folder.parents}
        if between <= owned:
            return True
    return False


def settings_class(component: str):
    module, name, _ = SETTINGS[component]
    return getattr(importlib.import_module(module), name)


def container(template: dict, component: str) -> dict:
    for task in resources(template, "AWS::ECS::TaskDefinition").values():
        for definition in task["Properties"]["ContainerDefinitions"]:
            if definition["Name"] == component:
                return definition
    raise AssertionError(f"no container {component} in the template")


def effective_setting(component: str, field: str, template: dict) -> str:
    """What a setting is in the ECS task: its environment over the image's ENV over the default
    (the section form CLICKSTREAM_<SECTION>_<KEY> wins over CLICKSTREAM_<KEY>, as in common.config)."""
    section = SETTINGS[component][2]
    names = (f"CLICKSTREAM_{field.upper()}", f"CLICKSTREAM_{section.upper()}_{field.upper()}")
    task_env = {variable["Name"]: variable["Value"] for variable in container(template, component).get("Environment", [])}
    value = str(getattr(settings_class(component)(), field))
    for env in (dockerfile_env(dockerfile(component)), task_env):
        for name in names:
            if name in env:
                value = str(env[name])
    return value


@pytest.mark.parametrize("component", TASKS)
def test_path_settings_with_a_relative_default_are_absolute_and_writable_in_the_image(component, template):
    # The images run as an unprivileged user in a root-owned /app: a relative default (the collector's
    # spool_dir, the trainer's cache_dir) would be a folder the process cannot create.
    section = SETTINGS[component][2]
    image_env = dockerfile_env(dockerfile(component))
    service = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text(encoding="utf-8"))["services"][component]
    task_env = {variable["Name"]: variable["Value"] for variable in container(template, component).get("Environment", [])}
    for field in dataclasses.fields(settings_class(component)):
        if not isinstance(field.default, Path) or field.default.is_absolute():
            continue
        names = [f"CLICKSTREAM_{field.name.upper()}", f"CLICKSTREAM_{section.upper()}_{field.name.upper()}"]
        set_to = [image_env[name] for name in names if name in image_env]
        assert set_to, f"deploy/{component}/Dockerfile leaves {field.name} at its relative default {field.default}"
        path = PurePosixPath(set_to[-1])
        assert path.is_absolute(), (component, field.name, path)
        assert writable_by_the_image_user(dockerfile(component), path), \
            f"deploy/{component}/Dockerfile: {field.name}={path} is not in a folder its user owns"
        for where, env in (("docker-compose.yml", service.get("environment") or {}), ("cloudformation.yaml", task_env)):
            for name in names:
                if name in env:
                    assert PurePosixPath(str(env[name])).is_absolute(), (where, name, env[name])


@pytest.mark.parametrize("component", TASKS)
def test_every_task_runs_on_a_read_only_root_writing_only_to_tmp_and_its_volumes(component, template):
    """Hardened containers (a read-only root filesystem, as Security Hub's ECS.5 asks): the image's
    writes must all land in /tmp (the task's storage) or a declared volume; the trainer's lake cache,
    matplotlib's cache and a multi-worker collector's metrics failed on a read-only root."""
    task = container(template, component)
    assert task["ReadonlyRootFilesystem"] is True
    definition = next(t for t in resources(template, "AWS::ECS::TaskDefinition").values()
                      if task in t["Properties"]["ContainerDefinitions"])
    volumes = {volume["Name"]: volume for volume in definition["Properties"]["Volumes"]}
    mounts = {PurePosixPath(m["ContainerPath"]) for m in task["MountPoints"] if m["SourceVolume"] in volumes}
    assert PurePosixPath("/tmp") in mounts and not {"Host", "EFSVolumeConfiguration"} & set(volumes["tmp"])
    assert re.search(r'^VOLUME \["/tmp"\]', dockerfile(component), re.MULTILINE)
    paths = {**dockerfile_env(dockerfile(component)), **{v["Name"]: v["Value"] for v in task.get("Environment", [])}}
    for name, value in paths.items():
        if name.startswith("CLICKSTREAM_") and name.endswith("_DIR") or name in ("MPLCONFIGDIR", "TMPDIR"):
            assert any(mount == PurePosixPath(value) or mount in PurePosixPath(value).parents for mount in mounts), \
                (component, name, value)
    service = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text(encoding="utf-8"))["services"][component]
    writable = {PurePosixPath(path) for path in service.get("tmpfs", [])} | {
        PurePosixPath(volume.split(":")[1]) for volume in service.get("volumes", [])}
    assert service["read_only"] is True and PurePosixPath("/tmp") in writable, service


def test_the_writable_check_sees_root_owned_folders():
    image = ("WORKDIR /app\nRUN useradd --uid 10001 app \\\n && mkdir -p /var/lib/clickstream/lake-cache "
             "&& chown app:app /var/lib/clickstream\nENV A=1 CLICKSTREAM_CACHE_DIR=/x\nUSER app\n")
    assert dockerfile_env(image) == {"A": "1", "CLICKSTREAM_CACHE_DIR": "/x"}
    assert writable_by_the_image_user(image, PurePosixPath("/var/lib/clickstream/spool"))     # made by the app
    assert not writable_by_the_image_user(image, PurePosixPath("/var/lib/clickstream/lake-cache"))  # root's
    assert not writable_by_the_image_user(image, PurePosixPath("/app/.cache/lake"))
    assert writable_by_the_image_user(image, PurePosixPath("/tmp/lake"))


def test_the_trainer_image_caches_the_lake_in_a_folder_made_for_its_user():
    text = dockerfile("trainer")
    cache = dockerfile_env(text).get("CLICKSTREAM_CACHE_DIR", "")
    assert cache.startswith("/"), f"CLICKSTREAM_CACHE_DIR={cache!r}: the default .cache/lake is in root's /app"
    owned, made = _ownership(text)
    assert PurePosixPath(cache) in owned & made and writable_by_the_image_user(text, PurePosixPath(cache)), cache


# ----------------------------------------------------------------------------- the collector's spool on ECS

def _ref(value) -> str | None:
    return value.get("Ref") if isinstance(value, dict) else None


def _image_uid(component: str) -> str:
    return re.search(r"useradd\b[^\n]*--uid (\d+)", dockerfile(component)).group(1)


def test_collector_spool_is_on_an_efs_volume_the_tasks_share(template):
    task = template["Resources"]["CollectorTaskDefinition"]["Properties"]
    collector = container(template, "collector")
    spool_dir = effective_setting("collector", "spool_dir", template)
    assert spool_dir.startswith("/"), spool_dir
    mounts = [m for m in collector.get("MountPoints", []) if m["ContainerPath"] == spool_dir]
    assert mounts and not mounts[0].get("ReadOnly", False), f"nothing writable is mounted at spool_dir {spool_dir}"
    volume = next(v for v in task.get("Volumes", []) if v["Name"] == mounts[0]["SourceVolume"])
    efs = volume["EFSVolumeConfiguration"]
    file_system = _ref(efs["FilesystemId"])
    assert template["Resources"][file_system]["Type"] == "AWS::EFS::FileSystem"
    assert template["Resources"][file_system]["Properties"].get("Encrypted") is True
    assert efs["TransitEncryption"] == "ENABLED"
    # An access point that makes the container's user the owner of every file, in a folder that user owns.
    point = template["Resources"][_ref(efs["AuthorizationConfig"]["AccessPointId"])]
    assert point["Type"] == "AWS::EFS::AccessPoint" and _ref(point["Properties"]["FileSystemId"]) == file_system
    uid = _image_uid("collector")
    assert collector["User"] == uid == point["Properties"]["PosixUser"]["Uid"]
    assert point["Properties"]["RootDirectory"]["CreationInfo"]["OwnerUid"] == uid
    # IAM authorization: the file system's policy lets the collector's task role mount and write.
    assert efs["AuthorizationConfig"].get("IAM") == "ENABLED"
    policy = json.dumps(template["Resources"][file_system]["Properties"]["FileSystemPolicy"])
    role = task["TaskRoleArn"]["Fn::GetAtt"][0]
    assert role in policy and "elasticfilesystem:ClientWrite" in policy and "elasticfilesystem:ClientMount" in policy


def test_collector_tasks_run_where_the_spool_has_mount_targets_that_take_their_nfs(template):
    service = template["Resources"]["CollectorService"]
    network = service["Properties"]["NetworkConfiguration"]["AwsvpcConfiguration"]
    targets = {name: r["Properties"] for name, r in resources(template, "AWS::EFS::MountTarget").items()}
    efs = template["Resources"]["CollectorTaskDefinition"]["Properties"]["Volumes"][0]["EFSVolumeConfiguration"]
    assert targets and all(_ref(t["FileSystemId"]) == _ref(efs["FilesystemId"]) for t in targets.values())
    # One mount target per subnet the tasks can be placed in (EFS allows one per Availability Zone).
    subnets = network["Subnets"]
    assert isinstance(subnets, list) and len(subnets) >= 2, subnets
    assert sorted(map(json.dumps, subnets)) == sorted(json.dumps(t["SubnetId"]) for t in targets.values())
    depends = service.get("DependsOn", [])
    assert set(targets) <= set([depends] if isinstance(depends, str) else depends), "tasks would start before the mount targets"
    tasks_groups = {_ref(group) for group in network["SecurityGroups"]}
    for target in targets.values():
        rules = [rule for group in target["SecurityGroups"]
                 for rule in template["Resources"][_ref(group)]["Properties"].get("SecurityGroupIngress", [])]
        assert any(rule["IpProtocol"] == "tcp" and rule["FromPort"] <= 2049 <= rule["ToPort"]
                   and _ref(rule.get("SourceSecurityGroupId")) in tasks_groups for rule in rules), rules


# Producer(max_attempts=3) per stream (collector/sink.py open_sink), each PutRecords without a botocore
# retry (kinesis_client: retries=0), each attempt up to a connect and a read timeout of sink_timeout_s;
# at a read timeout raised by a slow stream (up to sink_timeout_max_s), one attempt (Sink._produce).
SINK_ATTEMPTS = 3
FARGATE_MAX_STOP_TIMEOUT = 120


def test_a_stopping_collector_task_drains_before_ecs_kills_it(template):
    stop_timeout = container(template, "collector")["StopTimeout"]
    shutdown = float(effective_setting("collector", "shutdown_timeout_s", template))
    timeout = float(effective_setting("collector", "sink_timeout_s", template))
    raised = float(effective_setting("collector", "sink_timeout_max_s", template))
    in_flight = max(SINK_ATTEMPTS * 2 * timeout, timeout + raised)
    assert stop_timeout <= FARGATE_MAX_STOP_TIMEOUT
    assert shutdown + in_flight < stop_timeout, (shutdown, in_flight, stop_timeout)
    # Compose keeps the spool on a volume and waits stop_grace_period (10 s unless set) before it kills.
    service = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text(encoding="utf-8"))["services"]["collector"]
    env = {**dockerfile_env(dockerfile("collector")), **(service.get("environment") or {})}
    shutdown = float(env.get("CLICKSTREAM_COLLECTOR_SHUTDOWN_TIMEOUT_S", env.get(
        "CLICKSTREAM_SHUTDOWN_TIMEOUT_S", settings_class("collector")().shutdown_timeout_s)))
    assert shutdown < float(str(service.get("stop_grace_period", "10s")).rstrip("s"))


# ----------------------------------------------------------------------------- the scorer's API on ECS

def test_the_scorer_api_has_a_stable_name_in_the_vpc(template):
    registries = template["Resources"]["ScorerService"]["Properties"].get("ServiceRegistries", [])
    assert registries, "the scorer service registers nowhere: its API is only at changing task IPs"
    discovery = template["Resources"][registries[0]["RegistryArn"]["Fn::GetAtt"][0]]
    assert discovery["Type"] == "AWS::ServiceDiscovery::Service"
    # awsvpc tasks register their own IP: A records, no port
    assert any(record["Type"] == "A" for record in discovery["Properties"]["DnsConfig"]["DnsRecords"])
    namespace = template["Resources"][_ref(discovery["Properties"]["NamespaceId"])]
    assert namespace["Type"] == "AWS::ServiceDiscovery::PrivateDnsNamespace"
    assert _ref(namespace["Properties"]["Vpc"]) == "VpcId"
    name = f'{discovery["Properties"]["Name"]}.{namespace["Properties"]["Name"]["Fn::Sub"]}'
    outputs = [json.dumps(output["Value"]) for output in template["Outputs"].values()]
    assert any(f"{name}:8081" in value for value in outputs), (name, outputs)


# ----------------------------------------------------------------------------- the dashboard's metrics

def exported_metric_names() -> set[str]:
    """Every series name the components' /metrics can show, read from their registries."""
    from prometheus_client import REGISTRY, CollectorRegistry

    import collector.metrics  # noqa: F401 - registers in the default registry, as enrich and scorer do
    import enrich.metrics  # noqa: F401
    import scorer.metrics  # noqa: F401
    from batch.loader import LoaderCollector
    from discount.metrics import Metrics

    loader = CollectorRegistry()
    loader.register(LoaderCollector(type("NoLoaders", (), {"loaders": []})()))
    suffixes = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count", "_created"),
                "summary": ("", "_sum", "_count", "_created"), "info": ("_info",), "stateset": ("",), "unknown": ("",)}
    return {family.name + suffix for registry in (REGISTRY, Metrics().registry, loader)
            for family in registry.collect() for suffix in suffixes[family.type]}


PROMETHEUS_OWN = {"up"}         # series Prometheus itself writes per scraped target
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                "offset", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """The metric names of a PromQL expression: identifiers that are not functions, keywords, label
    names (in by/without/on/ignoring lists and {matchers}) or durations."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)                               # strings
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", text)                            # matchers, ranges
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    return {name for name in re.findall(r"(?<![\w.])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()", text)
            if name.lower() not in PROMQL_WORDS}


def test_promql_metric_names_finds_the_metrics_only():
    assert promql_metric_names('histogram_quantile(0.99, sum by (le) (rate(x_bucket{a="b"}[5m])))') == {"x_bucket"}
    assert promql_metric_names("sum(rate(a_total[5m])) / clamp_min(sum(rate(b_total[5m])), 1e-9)") == {"a_total", "b_total"}
    assert promql_metric_names("max by (name, version) (scorer_model_info)") == {"scorer_model_info"}


def test_every_dashboard_query_names_a_metric_the_components_export():
    dashboard = json.loads((DEPLOY / "grafana" / "clickstream.json").read_text(encoding="utf-8"))
    exported = exported_metric_names() | PROMETHEUS_OWN
    unknown = {(panel["title"], name) for panel in dashboard["panels"] for target in panel.get("targets", [])
               for name in promql_metric_names(target["expr"]) if name not in exported}
    assert not unknown, f"dashboard queries of metrics nothing exports (the panel shows No data): {sorted(unknown)}"


PROMETHEUS = DEPLOY / "prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"     # Debian's `prometheus` package; .ci/run installs it


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], cwd=PROMETHEUS, capture_output=True, encoding="utf-8", timeout=120, check=False)


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load((PROMETHEUS / "alerts.yml").read_text(encoding="utf-8"))["groups"] for rule in group["rules"]]


def test_every_alert_names_a_metric_the_components_export():
    # An alert on a metric nothing exports never fires: it reads as "all is well".
    exported = exported_metric_names() | PROMETHEUS_OWN
    unknown = {(rule["alert"], name) for rule in alert_rules() for name in promql_metric_names(rule["expr"])
               if name not in exported}
    assert not unknown, f"alerts on metrics nothing exports: {sorted(unknown)}"


def test_prometheus_loads_the_alerts():
    assert yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text(encoding="utf-8"))["rule_files"] == ["alerts.yml"]
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0 and "SUCCESS: 1 rule files found" in result.stdout + result.stderr, result
    volumes = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text(encoding="utf-8"))["services"]["prometheus"]["volumes"]
    assert "./prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in volumes


def test_each_alert_fires_in_its_failure_and_a_healthy_pipeline_fires_none():
    result = promtool("test", "rules", "alerts_test.yml")       # the scenarios: deploy/prometheus/alerts_test.yml
    assert result.returncode == 0, result.stdout + result.stderr
    tests = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text(encoding="utf-8"))["tests"]
    fired = {case["alertname"] for test in tests for case in test["alert_rule_test"] if case["exp_alerts"]}
    assert fired == {rule["alert"] for rule in alert_rules()}, "every alert has a scenario where it fires"


def test_every_alert_has_a_row_in_the_operations_doc():
    text = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    monitoring = text.split("## Monitoring", 1)[1].split("\n## ", 1)[0]
    first_cells = [line.split("|")[1] for line in monitoring.splitlines() if line.startswith("| `")]
    for rule in alert_rules():
        assert any(f"`{rule['alert']}`" in cell for cell in first_cells), rule["alert"]
        assert rule["labels"]["severity"] in ("page", "ticket")


def test_the_public_load_balancer_answers_the_collectors_own_endpoints_with_404(template):
    """/metrics and /sink-health tell the shop's traffic and the stream's health: not for the internet."""
    from collector.app import ROUTES

    internal = {path for path, route in ROUTES.items() if route in ("metrics", "sink-health")}
    rules = [r["Properties"] for r in resources(template, "AWS::ElasticLoadBalancingV2::ListenerRule").values()]
    blocked = {path for rule in rules if rule["Actions"][0]["Type"] == "fixed-response"
               for condition in rule["Conditions"] for path in condition["PathPatternConfig"]["Values"]}
    assert internal and internal <= blocked


def _resolved(value, names: dict[str, str]):
    """A template value with ${Prefix} and Fn::GetAtt [X, Arn] filled in from ``names``."""
    if isinstance(value, dict) and "Fn::Sub" in value:
        return value["Fn::Sub"].replace("${Prefix}", names["Prefix"])
    if isinstance(value, dict) and "Fn::GetAtt" in value:
        return names[value["Fn::GetAtt"][0]]
    if isinstance(value, dict):
        return {key: _resolved(item, names) for key, item in value.items()}
    if isinstance(value, list):
        return [_resolved(item, names) for item in value]
    return value


def test_a_failed_scheduled_task_and_nothing_else_reaches_the_alert_topic(template, aws_endpoint):
    """The failure rule's pattern and message, on the emulator's EventBridge: ECS's events for stopped
    tasks of the scheduled families that failed are told; a success, or a service's task, is not.

    The emulator's rules cannot target SNS (a queue stands in for the topic), and its matcher does not
    look into arrays of objects, so it cannot evaluate the exit-code branch (``containers`` is a list):
    that branch is checked for its form, AWS's documented one for a field of an array's objects."""
    rule = template["Resources"]["ScheduledTaskFailedRule"]["Properties"]
    families = {f"family:{template['Resources'][task]['Properties']['Family']['Fn::Sub']}" for task in schedules(template)}
    assert {group["Fn::Sub"] for group in rule["EventPattern"]["detail"]["group"]} == families
    assert rule["EventPattern"]["detail"]["$or"] == [{"containers": {"exitCode": [{"anything-but": 0}]}},
                                                     {"stopCode": ["TaskFailedToStart"]}]
    [target] = rule["Targets"]
    assert target["Arn"] == {"Ref": "ScheduledTaskAlerts"}

    suffix = uuid.uuid4().hex[:8]
    cluster = f"arn:aws:ecs:us-east-1:123456789012:cluster/shop-{suffix}"
    events, sqs = aws.client("events"), aws.client("sqs")
    queue = sqs.create_queue(QueueName=f"alerts-{suffix}")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    pattern = _resolved(rule["EventPattern"], {"Prefix": f"shop-{suffix}", "Cluster": cluster})
    events.put_rule(Name=f"failed-{suffix}", EventPattern=json.dumps(pattern))
    events.put_targets(Rule=f"failed-{suffix}", Targets=[
        {"Id": target["Id"], "Arn": queue_arn, "InputTransformer": target["InputTransformer"]}])

    def stopped(family: str, exit_code: int | None, in_cluster: str = cluster) -> dict:
        detail = {"clusterArn": in_cluster, "lastStatus": "STOPPED", "group": f"family:shop-{suffix}-{family}",
                  "taskArn": f"{cluster}/task/{family}", "containers": [{"name": family, "exitCode": exit_code}],
                  "stopCode": "EssentialContainerExited", "stoppedReason": "Essential container in task exited"}
        if exit_code is None:
            detail.update(containers=[{"name": family}], stopCode="TaskFailedToStart",
                          stoppedReason="CannotPullContainerError: image not found")
        return {"Source": "aws.ecs", "DetailType": "ECS Task State Change", "Detail": json.dumps(detail)}

    sent = [stopped("uplift", None), stopped("trainer", 0), stopped("scorer", None), stopped("skew", None, "elsewhere")]
    assert events.put_events(Entries=sent)["FailedEntryCount"] == 0
    told: list[str] = []
    for _ in range(3):
        told += [message["Body"] for message in sqs.receive_message(
            QueueUrl=queue, MaxNumberOfMessages=10, WaitTimeSeconds=1).get("Messages", [])]
    message = (f'"Scheduled task family:shop-{suffix}-uplift failed: CannotPullContainerError: image not found. '
               f"Task {cluster}/task/uplift; its log (in the stack's log group) has the exit code and why "
               "(docs/operations.md, 'Scheduled tasks').\"")
    assert told == [message], told


def test_the_trainer_reads_the_uplift_records_the_uplift_task_writes_and_writes_models_only(template):
    """Training leaves out the sessions offered a discount, listed in reports/uplift/ (batch/train_treated.py)."""
    statements = _statements(resources(template, "AWS::IAM::Role")["TrainerTaskRole"])
    [read] = [st for st in statements if st["Action"] == "s3:GetObject"]
    assert {"Fn::Sub": "${LakeBucket.Arn}/reports/uplift/*"} in read["Resource"]
    [write] = [st for st in statements if "s3:PutObject" in st["Action"]]
    assert write["Resource"] == {"Fn::Sub": "${LakeBucket.Arn}/models/*"}
    assert effective_setting("trainer", "bucket", template) == effective_setting("uplift", "bucket", template)
