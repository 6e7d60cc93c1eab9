"""[mesh] acceleration: the config key and the kernel allowlist (meshd/acceleration.py)."""
import pytest

from meshd import acceleration
from meshd.config import ConfigInvalid, parse_files


@pytest.mark.parametrize("raw, mode", [("true", "on"), ("false", "off"), ('"force"', "force")])
def test_config_values(raw, mode):
    assert parse_files({"m.toml": f"[mesh]\nacceleration = {raw}\n"}).mesh.acceleration == mode


@pytest.mark.parametrize("raw", ['"on"', "1", '"yes"', "[]"])
def test_config_rejects_other_values_with_file_line_key(raw):
    with pytest.raises(ConfigInvalid) as e:
        parse_files({"m.toml": f"[mesh]\n\nacceleration = {raw}\n"})
    (err,) = e.value.errors
    assert (err.file, err.line, err.key) == ("m.toml", 3, "mesh.acceleration")
    assert 'expected true, false or "force"' in err.message


def test_kernel_series():
    assert acceleration.kernel_series("6.18.44-fc-v669") == "6.18"
    assert acceleration.kernel_series("6.12.79") == "6.12"
    assert acceleration.kernel_series("7.0-rc1") == "7.0"


def test_on_needs_an_allowlisted_kernel_and_says_which(monkeypatch):
    d = acceleration.decide("on", "6.18.44-fc")
    assert not d.active and "allowlist (empty" in d.reason and "6.18.44-fc" in d.reason
    monkeypatch.setattr(acceleration, "KERNEL_ALLOWLIST", ("6.19", "7.0"))
    assert acceleration.decide("on", "6.19.2").active
    d = acceleration.decide("on", "6.12.79-amd64")
    assert not d.active
    assert "6.12.79-amd64" in d.reason and "(6.19, 7.0)" in d.reason and '"force"' in d.reason


def test_force_and_off():
    forced = acceleration.decide("force", "6.12.79")
    assert forced.active and "not on the allowlist" in forced.reason
    assert acceleration.decide("force", "6.18.1").active
    assert not acceleration.decide("off", "6.18.1").active
