"""services/auth.py: keys, bearer parsing, settings; the KV handshake's cluster-token challenge over
real loopback sockets (both ends in this process)."""
from __future__ import annotations

import pytest
import torch

from services.auth import KeyRing, api_keys, bearer, cluster_token, key_label, kv_proof, kv_proof_ok
from services.transport import KVHandshakeError, KVLayout, make_receiver, make_sender

pytestmark = pytest.mark.timeout(60)


def test_keyring_matches_each_key_and_labels_it_without_the_key():
    ring = KeyRing(["alpha", "beta"])
    assert ring.match("beta") == key_label("beta") and "beta" not in key_label("beta")
    assert ring.match("gamma") is None and ring.match("") is None and ring.match(None) is None
    assert not KeyRing([])


def test_settings_flags_and_environment():
    assert api_keys(["k1", " "], {"TANDEM_API_KEYS": "k2, ,k1"}) == ("k1", "k2")
    assert api_keys([], {}) == ()
    assert cluster_token({"TANDEM_CLUSTER_TOKEN": "  "}) is None
    assert cluster_token({"TANDEM_CLUSTER_TOKEN": "s3"}) == "s3"


@pytest.mark.parametrize("value,expected", [("Bearer abc", "abc"), ("bearer  abc ", "abc"), ("Basic abc", None),
                                            ("Bearer", None), ("", None), (None, None)])
def test_bearer(value, expected):
    assert bearer(value) == expected


def test_kv_proof_is_bound_to_token_nonce_and_side():
    p = kv_proof("t", "n", "sender")
    assert kv_proof_ok("t", "n", "sender", p)
    assert not kv_proof_ok("t", "n", "receiver", p) and not kv_proof_ok("t", "m", "sender", p)
    assert not kv_proof_ok("u", "n", "sender", p) and not kv_proof_ok("t", "n", "sender", None)


def _kv():
    # kv: [blocks, layers, 2, block_size, kv_heads, head_dim]
    return torch.zeros(8, 2, 2, 16, 2, 8)


@pytest.mark.parametrize("sender_token,receiver_token,refused_by", [
    (None, "secret", "the sender did not prove the cluster token (none sent)"),
    ("wrong", "secret", "the receiver did not prove the cluster token"),
    ("secret", None, "the receiver did not prove the cluster token"),
])
def test_kv_handshake_refuses_a_peer_without_the_cluster_token(sender_token, receiver_token, refused_by):
    kv = _kv()
    layout = KVLayout.of(kv, "tiny")
    receiver = make_receiver("tcp", layout, kv.clone(), timeout_s=10, token=receiver_token)
    sender = make_sender("tcp", layout, timeout_s=10, token=sender_token)
    try:
        with pytest.raises(KVHandshakeError) as e:
            sender.open("r1", receiver.address, kv)
        assert refused_by in str(e.value) and "cluster token" in str(e.value)
        assert receiver.stats()["transfers_committed"] == 0
    finally:
        sender.close()
        receiver.close()


def test_kv_transfer_between_members_with_the_token():
    src = torch.randn(8, 2, 2, 16, 2, 8)
    dst = torch.zeros_like(src)
    layout = KVLayout.of(src, "tiny")
    receiver = make_receiver("tcp", layout, dst, timeout_s=10, token="secret")
    sender = make_sender("tcp", layout, timeout_s=10, token="secret")
    commits = []
    try:
        receiver.expect("r1", [3, 4], lambda rid, n, meta: commits.append((rid, n)))
        transfer = sender.open("r1", receiver.address, src)
        transfer.push([0, 1], 0, 0, 2)
        transfer.commit(32, {}, timeout=10)
        assert commits == [("r1", 32)]
        assert torch.equal(dst[3:5], src[0:2])
    finally:
        sender.close()
        receiver.close()
