"""The run tree: which sessions to train, once, and who shares them.

Arms with the same schedule agree until their first boundary (and later ones
agree as long as their handoffs and settings do), so a session that several
arms have in common is one node, trained once and forked. Every branch then
starts from the same weights: the comparison is paired.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from optstate.study import Study, dataset_label


@dataclass
class Node:
    id: str
    dataset: str
    seed: int
    schedule: str
    session: int  # 0-based
    parent: str | None
    handoff: str | None  # applied at the start of this node; None for the first session
    epochs: int
    first_epoch: int  # global epoch at which this node starts (0-based)
    settings: dict
    arms: list[str] = field(default_factory=list)
    status: str = "pending"  # pending, done, diverged (non-finite loss), skipped (an ancestor diverged)
    diverged_at: int | None = None  # global step of the first non-finite training loss
    precision: str | None = None  # fp32 or bf16, once trained


@dataclass
class Run:
    dataset: str
    arm: str
    seed: int
    nodes: list[str]

    @property
    def folder(self) -> str:
        return f"runs/{self.dataset}/{arm_folder(self.arm)}/seed{self.seed}"


def arm_folder(arm: str) -> str:
    return arm.replace("/", "-")


@dataclass
class Plan:
    nodes: dict[str, Node]
    runs: list[Run]

    def ordered(self) -> list[Node]:
        """Parents before children, a dataset's nodes together."""
        return sorted(self.nodes.values(), key=lambda n: (n.dataset, n.seed, n.session, n.id))

    def children(self, node_id: str) -> list[Node]:
        return [n for n in self.nodes.values() if n.parent == node_id]

    def descendants(self, node_id: str) -> list[Node]:
        out = []
        for child in self.children(node_id):
            out += [child, *self.descendants(child.id)]
        return out

    def run_status(self, run: Run) -> str:
        """done, diverged (one of its sessions did, so later ones were skipped) or pending."""
        statuses = [self.nodes[i].status for i in run.nodes]
        if "diverged" in statuses:
            return "diverged"
        return "done" if all(s == "done" for s in statuses) else "pending"

    def epochs_trained(self) -> int:
        return sum(n.epochs for n in self.nodes.values() if n.status != "skipped")

    def epochs_unshared(self) -> int:
        return sum(self.nodes[i].epochs for r in self.runs for i in r.nodes)

    def to_json(self) -> str:
        return json.dumps(
            {"nodes": [asdict(n) for n in self.ordered()], "runs": [asdict(r) | {"folder": r.folder} for r in self.runs]},
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        data = json.loads(text)
        nodes = {n["id"]: Node(**n) for n in data["nodes"]}
        runs = [Run(**{k: v for k, v in r.items() if k != "folder"}) for r in data["runs"]]
        return cls(nodes, runs)


def build(study: Study) -> Plan:
    nodes: dict[str, Node] = {}
    runs: list[Run] = []
    labels = [dataset_label(d) for d in study.datasets]
    if len(set(labels)) != len(labels):
        from optstate.errors import UserError

        raise UserError(f"study: `datasets` has two entries with the same name ({', '.join(labels)}); rename a folder")
    for label in labels:
        for seed in range(study.seeds):
            for arm in study.arms:
                schedule, _, handoff = arm.partition("/")
                chain: list[str] = []
                key: list = [label, seed, schedule]
                first_epoch = 0
                for i in range(len(study.sessions)):
                    settings = study.settings(arm, i)
                    hand = handoff if i > 0 else None
                    key.append((hand, sorted(settings.items())))
                    digest = hashlib.sha1(repr(key).encode()).hexdigest()[:6]
                    path = "-".join([f"s{i + 1}"] + [handoff] * i)
                    node_id = f"{label}.seed{seed}.{schedule}.{path}.{digest}"
                    if node_id not in nodes:
                        nodes[node_id] = Node(
                            id=node_id, dataset=label, seed=seed, schedule=schedule, session=i,
                            parent=chain[-1] if chain else None, handoff=hand,
                            epochs=settings["epochs"], first_epoch=first_epoch, settings=settings,
                        )
                    nodes[node_id].arms.append(arm)
                    chain.append(node_id)
                    first_epoch += settings["epochs"]
                runs.append(Run(dataset=label, arm=arm, seed=seed, nodes=chain))
    return Plan(nodes, runs)
