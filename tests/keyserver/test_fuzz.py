"""schemathesis against the keyserver's own OpenAPI description, in process (ASGI): every
operation, admin ones included, with schema-valid and schema-violating requests, with a
valid admin, owner or auditor token, a wrong token, no token or whatever the generator
puts in the header.  The keyserver must never answer 5xx.

Bounded: a few dozen examples per operation and mode, so the test stays well under a minute
on two cores."""

from __future__ import annotations

import time

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from sealedtorch.attest import sim
from sealedtorch.keys import ModelKey
from sealedtorch.keyserver import app as ks_app
from sealedtorch.keyserver import config, server
from sealedtorch.keyserver.audit_recorder import RequestContext

EXAMPLES = 20
BUDGET_S = 45.0


def test_openapi_fuzz_never_answers_5xx(tmp_path):
    init = config.init_data_dir(tmp_path / "data", now=time.time())
    sim.init_platform(tmp_path / "sim")
    service = server.build_keyserver(init.config,
                                     trust_sim_roots=[tmp_path / "sim" / sim.PUB_FILE])
    try:
        _fuzz(service, init)
    finally:
        service.store.close()


def _fuzz(service, init) -> None:
    admin_token = init.admin_token_file.read_text().strip()
    who = service.authenticate_admin(admin_token, RequestContext(), "setup")
    from sealedtorch.keyserver import protocol

    owner = service.create_token(who, RequestContext(), protocol.TokenCreateRequest(
        role="owner", name="fuzz-owner")).token
    auditor = service.create_token(who, RequestContext(), protocol.TokenCreateRequest(
        role="auditor", name="fuzz-auditor")).token
    key = ModelKey.generate("fuzz-model")
    service.register(who, RequestContext(), protocol.RegisterRequest(
        model_id=key.model_id, key=protocol.KeyMaterial(
            version=1, key=protocol.b64encode(key.secret)),
        policy={"allow": [{"tee": "sim", "measurement": "00" * 48}]}))

    app = ks_app.create_app(service)
    schema = schemathesis.openapi.from_asgi("/v1/openapi.json", app)
    auths = st.sampled_from([admin_token, owner, auditor, "sta_" + "A" * 43, "x.y.z", "",
                             None])
    deadline = time.monotonic() + BUDGET_S
    operations = [r.ok() for r in schema.get_all_operations()]
    labels = {op.label for op in operations}
    assert {"POST /v1/attest", "POST /v1/admin/tokens", "GET /v1/admin/audit",
            "GET /metrics"} <= labels, labels
    server_errors: list[str] = []
    counter = [0]
    unsatisfiable = 0
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            if time.monotonic() > deadline:
                pytest.fail(f"fuzz budget of {BUDGET_S} s exceeded at {op.label}")

            run = _runner(op, mode, auths, server_errors, counter)
            try:
                run()
            except Unsatisfiable:  # nothing to violate (an operation without input)
                assert mode is GenerationMode.NEGATIVE, op.label
                unsatisfiable += 1
    assert counter[0] > 200 and unsatisfiable < len(operations) // 2, (counter, unsatisfiable)
    assert not server_errors, "\n".join(server_errors[:10])


def _runner(op, mode, auths, server_errors: list[str], counter: list[int]):
    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy(generation_mode=mode), auth=auths)
    def run(case, auth) -> None:
        headers = None
        if auth is not None:  # None: keep whatever the generator produced
            headers = {"Authorization": f"Bearer {auth}"}
        response = case.call(headers=headers)
        counter[0] += 1
        if response.status_code >= 500:
            server_errors.append(f"{op.label} [{mode.value}] -> {response.status_code}: "
                                 f"{response.text[:300]}\n  {case.as_curl_command()}")

    return run
