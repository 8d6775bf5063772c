"""docs/awx/configure.yml, the AWX configuration as code (awx.awx), without an AWX: it parses, every
option it gives an awx.awx module is one the module documents, and the surveys have AWX's shape and
ask for what the playbooks read, with the choices the modules accept."""

from __future__ import annotations

import json
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONFIGURE = REPO / "docs" / "awx" / "configure.yml"
PLAY = yaml.safe_load(CONFIGURE.read_text().replace("!unsafe ", ""))[0]
SURVEYS = PLAY["vars"]["ft_awx_surveys"]
QUESTION_TYPES = {"text", "textarea", "password", "integer", "float", "multiplechoice", "multiselect"}


@cache
def options(module: str) -> dict:
    r = subprocess.run([BIN / "ansible-doc", "--json", module], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)[module]["doc"]["options"]


def test_the_playbook_passes_the_syntax_check():
    r = subprocess.run([BIN / "ansible-playbook", "-i", "localhost,", "--syntax-check", CONFIGURE], cwd=REPO,
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_awx_task_gives_only_options_its_module_documents():
    awx_tasks = [(m, args) for task in PLAY["tasks"] for m, args in task.items() if m.startswith("awx.awx.")]
    wanted = {"credential_type", "project", "inventory_source", "job_template", "schedule"}
    assert {m for m, _ in awx_tasks} >= {f"awx.awx.{m}" for m in wanted}
    for module, args in awx_tasks:
        unknown = set(args) - set(options(module))
        assert not unknown, f"{module}: {unknown}"


def test_the_credential_type_injects_the_secret_the_role_reads():
    (task,) = [t["awx.awx.credential_type"] for t in PLAY["tasks"] if "awx.awx.credential_type" in t]
    assert task["name"] == "FT peer secret" and task["kind"] == "cloud"
    assert task["inputs"]["fields"] == [
        {"id": "secret", "type": "string", "label": "Peer secret", "secret": True}
    ]
    assert task["injectors"] == {"extra_vars": {"ft_engine_secret": "{{ secret }}"}}  # templated by AWX


@pytest.mark.parametrize("survey", sorted(SURVEYS))
def test_each_survey_has_the_shape_awx_takes(survey):
    spec = SURVEYS[survey]
    assert set(spec) == {"name", "description", "spec"} and spec["spec"]
    variables = [q["variable"] for q in spec["spec"]]
    assert len(variables) == len(set(variables))
    for q in spec["spec"]:
        assert {"question_name", "question_description", "variable", "type", "required"} <= set(q), q
        assert q["type"] in QUESTION_TYPES and isinstance(q["required"], bool), q
        if q["type"] == "multiplechoice":
            assert isinstance(q["choices"], list) and q["default"] in q["choices"], q
        if q["type"] in ("text", "integer"):
            assert q["min"] <= q["max"], q


def test_the_surveys_ask_for_what_the_playbooks_read_with_the_choices_the_modules_take():
    playbooks = REPO / "collections" / "ansible_collections" / "ft" / "lockstep" / "playbooks"
    for survey, playbook in (("protect", "protect.yml"), ("drill", "drill.yml")):
        text = (playbooks / playbook).read_text()
        for q in SURVEYS[survey]["spec"]:
            assert q["variable"] in text, (survey, q["variable"])
    choices = {q["variable"]: q.get("choices") for s in SURVEYS.values() for q in s["spec"]}
    assert choices["ft_vm_state"] == options("ft.lockstep.ft_vm")["state"]["choices"]
    assert choices["ft_drill_action"] == options("ft.lockstep.ft_drill")["action"]["choices"]


def test_the_job_templates_run_the_project_wrappers_and_use_every_survey():
    templates = PLAY["vars"]["ft_awx_templates"]
    assert [t["name"] for t in templates] == ["FT site", "FT protect", "FT drill", "FT status"]
    for t in templates:
        wrapper = yaml.safe_load((REPO / t["playbook"]).read_text())
        assert wrapper[0]["ansible.builtin.import_playbook"] == "ft.lockstep." + Path(t["playbook"]).stem
    assert sorted(t["survey"] for t in templates if "survey" in t) == sorted(SURVEYS)
