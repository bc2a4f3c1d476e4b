"""Points from verified ledgers. Fake clients cost nothing, so a receipt counts by its signer's own standing:
EigenTrust's iteration over "who received work from whom", seeded by trusted peers (or by every server with a
ledger), or, in a private swarm, only receipts of allow-listed signers count. Pure functions of plain data.

Unit: one point is 1e9 parameter-tokens: one token through a billion parameters of blocks (about 2 GFLOP)."""

from __future__ import annotations

from typing import Collection, Mapping

PARAMETER_TOKENS_PER_POINT = 1e9
TRUST_FROM_SEEDS = 0.15  # EigenTrust's alpha: the share of standing that always flows back to the seeds
ITERATIONS = 50


def standing(
    work: Mapping[str, Mapping[str, float]], seeds: Collection[str] = (), iterations: int = ITERATIONS
) -> dict[str, float]:
    """Each ledger owner's standing, in [0, 1] (the mean owner's is 1, capped at 1). `work[server][signer]` is the
    work in `server`'s verified ledger signed by `signer`: the signer's trust flows to the server in proportion.
    Seeds (default: every owner) get TRUST_FROM_SEEDS of all trust every round; peers without a ledger get none."""
    owners = sorted(work)
    if not owners:
        return {}
    seeds = [owner for owner in owners if owner in seeds] or owners
    seed_share = {owner: (1.0 / len(seeds) if owner in seeds else 0.0) for owner in owners}
    given: dict[str, dict[str, float]] = {owner: {} for owner in owners}  # signer -> server -> work received from it
    for server, by_signer in work.items():
        for signer, amount in by_signer.items():
            if signer in given and signer != server and amount > 0:
                given[signer][server] = given[signer].get(server, 0.0) + amount
    trust = dict(seed_share)
    for _ in range(iterations):
        flow = {owner: 0.0 for owner in owners}
        for signer, servers in given.items():
            total = sum(servers.values())
            targets = {s: a / total for s, a in servers.items()} if total else seed_share  # nothing given: to the seeds
            for server, share in targets.items():
                flow[server] += trust[signer] * share
        trust = {o: (1 - TRUST_FROM_SEEDS) * flow[o] + TRUST_FROM_SEEDS * seed_share[o] for o in owners}
    return {owner: min(1.0, trust[owner] * len(owners)) for owner in owners}


def points(
    work: Mapping[str, Mapping[str, float]], seeds: Collection[str] = (), allow: Collection[str] | None = None
) -> dict[str, float]:
    """Each ledger owner's points: its receipts' work weighted by their signers' standing (with `allow`, a private
    swarm's list: 1 for an allow-listed signer, 0 for others), never counting receipts a server signed for itself."""
    weight = {signer: 1.0 for signer in allow} if allow is not None else standing(work, seeds)
    return {
        server: sum(amount * weight.get(signer, 0.0) for signer, amount in by_signer.items() if signer != server)
        / PARAMETER_TOKENS_PER_POINT
        for server, by_signer in work.items()
    }
