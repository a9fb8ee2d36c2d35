"""The seed's ``AdvancedSecurity(config).secure(...)`` from pimoe.compat."""

import pytest
import torch

from pimoe.privacy.crypto import IntegrityError, generate_key


def test_seed_secure_call_seals_the_output(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PIMOE_KEY", raising=False)
    from pimoe.compat import AdvancedSecurity

    fused_output = torch.randn(4, 16)
    # --- the seed's lines, verbatim but for the import ---
    config = None
    advanced_system = {"advanced_security": AdvancedSecurity(config)}
    secure_output = advanced_system["advanced_security"].secure(fused_output)
    # --- end ---
    assert (
        isinstance(secure_output, bytes)
        and fused_output.numpy().tobytes()[:16] not in secure_output
    )
    security = advanced_system["advanced_security"]
    assert torch.equal(security.open(secure_output)["tensor"], fused_output)
    tampered = bytearray(secure_output)
    tampered[-1] ^= 1
    with pytest.raises(IntegrityError):
        security.open(bytes(tampered))
    with pytest.raises(IntegrityError):
        AdvancedSecurity().open(secure_output)  # another fresh key


def test_key_from_env_or_explicit(monkeypatch: pytest.MonkeyPatch) -> None:
    from pimoe.compat import AdvancedSecurity

    key = generate_key()
    monkeypatch.setenv("PIMOE_KEY", key.hex())
    state = {"w": torch.ones(3)}
    blob = AdvancedSecurity().secure(state)
    assert torch.equal(AdvancedSecurity(key=key).open(blob)["w"], state["w"])
