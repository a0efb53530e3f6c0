"""Integration tests run against real processes; the Redis fixtures live in tests/redis_fixtures."""
from tests.integration.cluster_helpers import hf_tiny  # noqa: F401  (pytest fixture)
from tests.integration.http_helpers import chat_model_dir, client, name, openai_cluster  # noqa: F401  (pytest fixtures)
from tests.redis_fixtures import redis_server, redis_url  # noqa: F401  (pytest fixtures)
