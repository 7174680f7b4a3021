"""Feast feature services: the feature contract each model version reads.

The name must equal ``settings.feature_service`` (tests check it). New features mean a new
service version (``sasrec_v2``), never an edit of this one.
"""

from feast import FeatureService
from feature_views import item_content, item_stats, user_recent_items, user_stats

# Contract of SASRec model contract version 1: user sequence and stats, item stats and content.
sasrec_v1 = FeatureService(
    name="sasrec_v1",
    features=[user_recent_items, user_stats, item_stats, item_content],
    description="Features read by SASRec contract v1 (training via get_historical_features, serving online)",
    tags={"owner": "recloop", "model_contract": "v1"},
)
