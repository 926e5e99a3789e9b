"""The online endpoint (Ray Serve): `app` holds the routes and the deployment, `openai` OpenAI's request
and answer shapes, `errors` the one error shape, `chat` the chat templates. `serve run` and the Serve
configs name `pipelines.serve:build_app`."""

from .app import BloomEndpoint, app, app_from_config, build_app

__all__ = ["BloomEndpoint", "app", "app_from_config", "build_app"]
