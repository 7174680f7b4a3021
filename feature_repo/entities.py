"""Feast entities: the join keys of every feature view. External ids are strings (docs/architecture.md)."""

from feast import Entity, ValueType

# An app user; join key is the raw external user id.
user = Entity(
    name="user",
    join_keys=["user_id"],
    value_type=ValueType.STRING,
    description="An app user (raw external user id)",
    tags={"owner": "recloop"},
)

# A catalogue item; join key is the raw external item id, never the model's item_idx.
item = Entity(
    name="item",
    join_keys=["item_id"],
    value_type=ValueType.STRING,
    description="A catalogue item (raw external item id)",
    tags={"owner": "recloop"},
)
