"""One rule for the guidance scale a generator samples at (`Generator.check_guidance_scale`): `lcm generate` and the
server refused g < 1 for a model with an ω input and g outside [0, 30], while the Python call took g = 0.5, −3 and 1e6
and fed ω = g − 1 < 0 or 999999 into the ω embedding without a word."""

import pytest

from latent_consistency.errors import UserError


@pytest.mark.parametrize("g, message", [(0.5, "is below 1"), (-3.0, "is outside [0, 30]"), (1e6, "is outside [0, 30]")])
def test_the_python_call_refuses_what_the_command_refuses(lcm, g, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        lcm(["a red square"], steps=1, guidance_scale=g)


def test_the_python_call_takes_the_trained_range(lcm):
    assert lcm(["a red square"], steps=1, guidance_scale=1.0).shape[0] == 1


def test_the_command_names_its_flag(tiny_lcm, run_error):
    code, err = run_error(["generate", "a red square", "--model", str(tiny_lcm), "--guidance-scale", "0.5",
                           "--out", "unused", "--device", "cpu"])
    assert code == 2 and "error: --guidance-scale 0.5 is below 1:" in err and "ω >= 0" in err
