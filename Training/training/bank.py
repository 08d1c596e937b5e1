"""ProLearn's prototype bank during training: the image query aligned with the reports, k-means over joint
image+text vectors of the samples with reports (on rank 0, shared with the others), and the image keys following the
encoder after every epoch."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from languageguidedseg.network import LanguageGuidedSegNet
from languageguidedseg.prototypes import build_bank, refresh_keys

from .data import Preloaded, Reports
from .losses import info_nce, pseudo_label_positives
from .runtime import Runtime


@torch.no_grad()
def image_embeddings(network: LanguageGuidedSegNet, data: Preloaded, indices: list[int], runtime: Runtime,
                     batch_size: int = 64) -> torch.Tensor:
    """Eval-mode bank query vectors of some preloaded samples."""
    pooled = pooled_features(network, data, indices, runtime, batch_size)
    with runtime.autocast():
        return network.embed_head(pooled.to(runtime.device)).float().cpu()


@torch.no_grad()
def pooled_features(network: LanguageGuidedSegNet, data: Preloaded, indices: list[int], runtime: Runtime,
                    batch_size: int = 64) -> torch.Tensor:
    """Eval-mode encoder features of some preloaded samples, pooled as the bank's query pools them ``[N, C]``
    (:meth:`LanguageGuidedSegNet.query_features`)."""
    network.eval()
    out = []
    for start in range(0, len(indices), batch_size):
        batch = data.images[indices[start:start + batch_size]].float().to(runtime.device,
                                                                          memory_format=torch.channels_last)
        with runtime.autocast():
            out.append(network.query_features(network.encoder(batch)[-1]).cpu())
    network.train()
    return torch.cat(out) if out else torch.zeros(0, network.encoder.channels[-1])


def _retrieval_accuracy(image: torch.Tensor, text: torch.Tensor, positives: torch.Tensor) -> float:
    """Share of samples whose most similar report (by the query's cosine similarity) is one of their positives."""
    sims = torch.nn.functional.normalize(image, dim=-1) @ torch.nn.functional.normalize(text, dim=-1).t()
    return float(positives.gather(1, sims.argmax(1, keepdim=True)).float().mean())


def align_query(network: LanguageGuidedSegNet, data: Preloaded, reports: Reports, epochs: int, lr: float,
                temperature: float, seed: int, runtime: Runtime, batch_size: int = 128) -> tuple[float, float]:
    """Train the bank's image query head alone before clustering, ``epochs`` passes of InfoNCE against the report
    embeddings (same pseudo-label or report = positive), on the encoder's features of the samples with reports,
    computed once: ProLearn's contrastive warm-up of the query, for the price of one forward pass over them.

    Returns the image-to-report retrieval accuracy before and after (on those samples). Runs on rank 0; the head's
    weights are shared with the others.
    """
    head = network.embed_head
    accuracy = (float("nan"), float("nan"))
    state: list = [None]
    if runtime.main:
        with_report = [i for i, r in enumerate(data.report_index.tolist()) if r >= 0]
        features = pooled_features(network, data, with_report, runtime)
        rows = data.report_index[with_report]
        text = reports.pooled[rows].to(runtime.device)
        positives = pseudo_label_positives(reports.labels[rows], torch.ones(len(rows), dtype=torch.bool),
                                           rows[:, None] == rows[None, :]).to(runtime.device)
        features = features.to(runtime.device)
        with torch.no_grad():
            before = _retrieval_accuracy(head(features), text, positives)
        optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.01)
        generator = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            order = torch.randperm(len(rows), generator=generator).to(runtime.device)
            for start in range(0, len(order) - 1, batch_size):  # a batch of one has no negatives
                batch = order[start:start + batch_size]
                loss = info_nce(head(features[batch]), text[batch], positives[batch][:, batch], temperature)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        with torch.no_grad():
            accuracy = (before, _retrieval_accuracy(head(features), text, positives))
        state = [{k: v.cpu() for k, v in head.state_dict().items()}]
    head.load_state_dict(runtime.broadcast(state)[0])
    return accuracy


@dataclass
class BankMembers:
    """Which training samples each prototype was clustered from, the one whose report it shows, and that report."""

    members: list[list[int]] = field(default_factory=list)
    representatives: list[int] = field(default_factory=list)
    reports: list[str] = field(default_factory=list)


def fill_bank(network: LanguageGuidedSegNet, data: Preloaded, reports: Reports, clusters_per_class: int, seed: int,
              runtime: Runtime, tokens: bool = True) -> BankMembers:
    """Cluster the samples with reports into the network's bank (per pseudo-label class where there is a parser);
    with ``tokens`` each prototype keeps its members' averaged token features, else their pooled embedding.

    The bank's text values become a new parameter: the caller puts it in the optimiser.
    """
    with_report = [i for i, r in enumerate(data.report_index.tolist()) if r >= 0]
    payload: list = [None] * 6
    if runtime.main:
        image = image_embeddings(network, data, with_report, runtime)
        rows = data.report_index[with_report]
        text = reports.pooled[rows]
        classes = None
        if reports.labels.shape[1]:
            labels = reports.labels[rows]
            classes = [torch.nonzero(labels[:, c]).flatten().tolist() for c in range(labels.shape[1])]
        content = build_bank(image, text, classes, clusters_per_class, seed,
                             (reports.tokens[rows], reports.mask[rows]) if tokens else None)
        payload = [content.image_keys, content.text_values, content.classes,
                   [[with_report[i] for i in m] for m in content.members],
                   [with_report[i] for i in content.representatives], content.token_mask]
    keys, values, classes, members, representatives, token_mask = runtime.broadcast(payload)
    network.bank.fill(keys, values, classes, token_mask)
    network.config.bank_size, network.config.bank_tokens = network.bank.size, network.bank.tokens
    text_of = {row: report for report, row in reports.index.items()}
    return BankMembers(members, representatives, [text_of[int(data.report_index[i])] for i in representatives])


def join_bank(network: LanguageGuidedSegNet, data: Preloaded, reports: list[str], runtime: Runtime) -> BankMembers:
    """Members for a bank that came with the network (``init_from``): each training sample with a report joins the
    prototype with the nearest image key, so that the keys follow the encoder as in a run that clustered its own
    bank; the prototypes keep their ``reports``."""
    members: list = [None]
    if runtime.main:
        with_report = [i for i, r in enumerate(data.report_index.tolist()) if r >= 0]
        nearest = network.bank.rank(image_embeddings(network, data, with_report, runtime), top_k=1)[1][:, 0]
        members = [[[s for s, p in zip(with_report, nearest.tolist()) if p == k] for k in range(network.bank.size)]]
    return BankMembers(runtime.broadcast(members)[0], [], list(reports))


def refresh_bank_keys(network: LanguageGuidedSegNet, data: Preloaded, bank: BankMembers, runtime: Runtime) -> None:
    """Recompute each prototype's image key from its members with the current encoder (on rank 0, shared)."""
    if not bank.members:
        return
    if runtime.main:
        used = sorted({i for m in bank.members for i in m})
        position = {i: j for j, i in enumerate(used)}
        embeddings = image_embeddings(network, data, used, runtime)
        refresh_keys(network.bank, embeddings, [[position[i] for i in m] for m in bank.members])
    runtime.broadcast_tensor(network.bank.image_keys)
