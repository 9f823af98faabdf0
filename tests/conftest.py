pytest_plugins = ["fake_fixtures", "service_fixtures", "redis_fixtures"]
