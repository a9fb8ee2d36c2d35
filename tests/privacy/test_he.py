import numpy as np
import pytest

from pimoe.privacy.he import (
    CKKSParams,
    add_encrypted,
    decrypt_mean,
    encrypt_update,
    load_context,
    make_context,
    public_context,
)

PARAMS = CKKSParams()
LENGTH = PARAMS.slots + 900  # two ciphertext chunks, the second one partly filled


@pytest.fixture(scope="module")
def setup():
    context = make_context(PARAMS)
    server = load_context(public_context(context))
    rng = np.random.default_rng(0)
    updates = [(0.1 * rng.standard_normal(LENGTH)).astype(np.float32) for _ in range(3)]
    encrypted = [encrypt_update(context, u) for u in updates]
    return context, server, updates, encrypted


def test_server_context_has_no_secret_key(setup) -> None:
    context, server, _, encrypted = setup
    assert context.is_private() and context.has_secret_key()
    assert server.is_public() and not server.has_secret_key()
    with pytest.raises(ValueError, match="Secret key"):
        server.secret_key()
    import tenseal as ts

    with pytest.raises(ValueError):  # the server cannot decrypt a client's update
        ts.ckks_vector_from(server, encrypted[0][0]).decrypt()


def test_mean_matches_plaintext(setup) -> None:
    context, server, updates, encrypted = setup
    assert [len(e) for e in encrypted] == [2, 2, 2]
    summed = add_encrypted(server, encrypted)
    mean = decrypt_mean(context, summed, num_clients=3, length=LENGTH)
    plain = np.mean([u.astype(np.float64) for u in updates], axis=0)
    assert mean.shape == (LENGTH,)
    assert np.abs(mean - plain).max() < 1e-6
    assert (
        np.abs(mean - plain).max() > 0
    )  # CKKS is approximate: an exact match would mean no encryption


def test_ciphertexts_do_not_hold_the_plaintext(setup) -> None:
    _, _, updates, encrypted = setup
    assert updates[0].tobytes()[:64] not in encrypted[0][0]
    assert encrypt_update(setup[0], updates[0])[0] != encrypted[0][0]  # randomized encryption


def test_bad_inputs(setup) -> None:
    context, server, _updates, encrypted = setup
    with pytest.raises(ValueError, match="secret key"):
        add_encrypted(context, encrypted)
    with pytest.raises(ValueError, match="chunks"):
        add_encrypted(server, [encrypted[0], encrypted[1][:1]])
    with pytest.raises(ValueError, match="CKKS vector"):
        add_encrypted(server, [[b"garbage", b"garbage"]])
    with pytest.raises(ValueError, match="secret key"):
        decrypt_mean(server, encrypted[0], 1, LENGTH)
    with pytest.raises(ValueError, match="expected 5"):
        decrypt_mean(context, encrypted[0], 1, 5)
    with pytest.raises(ValueError, match="NaN"):
        encrypt_update(context, np.array([np.inf], np.float32))
    with pytest.raises(TypeError, match="1-D float"):
        encrypt_update(context, np.ones((2, 2)))
    with pytest.raises(ValueError, match="TenSEAL context"):
        load_context(b"not a context")
