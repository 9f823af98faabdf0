pytest_plugins = ["fake_comfyui.fixtures", "service_fixtures"]
