"""Every config round-trips through JSON; the CLI's --help does not import torch."""

import json
import math
import subprocess
import sys

import pytest

from diffattr import AttributionConfig, AuditConfig, DiffattrError, ScoringConfig
from diffattr.config import GradientConfig

CONFIGS = [
    ScoringConfig(num_timesteps=7, num_draws=2, seed=5, batch_size=3),
    AttributionConfig(direction="descent", learning_rate=3e-3, aggregation="loss", params="attention"),
    AttributionConfig(target_change=0.5, null_stop=0.95, retain_batch=8, query_weight=0.2, optimizer="adamw"),
    GradientConfig(projection_dim=16, damping=math.inf),
    AuditConfig(samples=4, alpha=0.3, gap_timesteps=0.25),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: type(c).__name__)
def test_a_saved_and_reloaded_config_compares_equal(config):
    saved = json.loads(json.dumps(config.to_dict()))
    assert type(config).from_dict(saved) == config
    assert type(config).from_dict(type(config)().to_dict()) == type(config)()


def test_from_dict_refuses_unknown_fields_and_non_objects():
    with pytest.raises(DiffattrError, match=r"unknown ScoringConfig fields \['timestep'\]"):
        ScoringConfig.from_dict({"timestep": 3})
    with pytest.raises(DiffattrError, match="expected a JSON object"):
        AttributionConfig.from_dict([1, 2])


def test_optional_fields_parse_from_their_flags():
    from diffattr.cli import AttributionConfig as CliConfig
    from diffattr.cli import _config_from, build_parser

    flags = ["--target-change", "0.5", "--null-stop", "0.95", "--retain-batch", "8", "--optimizer", "adamw"]
    args = build_parser().parse_args(
        ["attribute", "--model", "m", "--train", "t", "--run-dir", "r", "--query", "q.png", *flags]
    )
    config = _config_from(args, CliConfig)
    assert (config.target_change, config.null_stop, config.retain_batch, config.optimizer) == (0.5, 0.95, 8, "adamw")
    default = _config_from(
        build_parser().parse_args(["attribute", "--model", "m", "--train", "t", "--run-dir", "r", "--query", "q.png"]),
        CliConfig,
    )
    assert default == AttributionConfig() and default.target_change is None and not default.stops_early


def test_the_cli_help_does_not_import_torch():
    code = (
        "import sys\nfrom diffattr.cli import build_parser\nbuild_parser().format_help()\nprint('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
