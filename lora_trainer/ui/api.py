"""HTTP routes under /lora_trainer/ for scripts: start a job, watch it, save or preview it on demand, interrupt it,
use its best checkpoint, list the LoRAs.

The same routes are mounted on the WebUI's FastAPI app (on_app_started) and on the standalone app's.
Bodies are read as plain JSON, so the routes work under pydantic 1 (WebUI) and 2 (Forge, current FastAPI).
"""

# no `from __future__ import annotations`: FastAPI must see the real Request class in the route signature
from lora_trainer.errors import LoraTrainerError
from lora_trainer.jobs import BusyError, Trainer

PREFIX = "/lora_trainer"


def register_api(app, trainer: Trainer, *, prefix: str = PREFIX, dependencies: list | None = None) -> None:
    """Add the routes to a FastAPI app.

    POST {prefix}/train      body: {"config": {key: value, ...}} (or the keys at the top level);
                             201 with the job, 409 while another job runs, 422 for a bad config
    GET  {prefix}/status     the current (or last) job: state, step, total, losses, eta_seconds, lora_file, ...
    POST {prefix}/plan       body as for train: {"plan": the predicted peak GPU memory of that run on the host's
                             model and what memory: auto would pick}, 422 for a bad config
    POST {prefix}/interrupt  stop after the current step, saving what was trained
    POST {prefix}/save_now   a checkpoint and its LoRA after the current step (into the LoRA folder as NAME-stepN);
                             409 when nothing is training
    POST {prefix}/sample_now body (optional): {"prompt": "..."}; previews after the current step, of the prompt or the
                             run's sample prompts (the status's samples and sample_grid); 409 when nothing is training
    POST {prefix}/use_best   the finished job's best checkpoint becomes NAME, the last NAME-last; 409 when it cannot
    GET  {prefix}/results    LoRA files in the host's LoRA folder, newest first
    """
    from fastapi import Request
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool

    async def read_config(request: Request):
        """The body's config, or the response that says why there is none."""
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"error": "The body must be JSON: {\"config\": {...}}."}, status_code=400)
        config = body.get("config", body) if isinstance(body, dict) else None
        if not isinstance(config, dict):
            return JSONResponse({"error": "The body must be a JSON object: {\"config\": {...}}."}, status_code=400)
        return config

    async def train(request: Request):
        config = await read_config(request)
        if not isinstance(config, dict):
            return config
        try:
            job = await run_in_threadpool(trainer.start, config)
        except BusyError as exc:
            return JSONResponse({"error": str(exc)}, status_code=409)
        except LoraTrainerError as exc:
            return JSONResponse({"error": str(exc)}, status_code=422)
        return JSONResponse(job.as_dict(), status_code=201)

    async def plan(request: Request):
        config = await read_config(request)
        if not isinstance(config, dict):
            return config
        try:
            return {"plan": await run_in_threadpool(trainer.memory_plan, config)}
        except LoraTrainerError as exc:
            return JSONResponse({"error": str(exc)}, status_code=422)

    def status():
        return trainer.job.as_dict() if trainer.job else {"state": "idle", "running": False}

    def interrupt():
        return {"interrupted": trainer.interrupt()}

    def results():
        return trainer.results()

    def refused(message: str):
        return JSONResponse({"error": message}, status_code=409)

    def save_now():
        return {"asked": True} if trainer.save_now() else refused("Nothing is training.")

    async def sample_now(request: Request):
        try:
            body = await request.json()
        except ValueError:
            body = {}
        prompt = body.get("prompt", "") if isinstance(body, dict) else ""
        if not isinstance(prompt, str):
            return JSONResponse({"error": "'prompt' must be text."}, status_code=400)
        return {"asked": True} if trainer.sample_now(prompt) else refused("Nothing is training.")

    async def use_best():
        try:
            return {"message": await run_in_threadpool(trainer.use_best), "job": trainer.job.as_dict()}
        except LoraTrainerError as exc:
            return refused(str(exc))

    extra = {"dependencies": dependencies} if dependencies else {}
    app.add_api_route(f"{prefix}/train", train, methods=["POST"], **extra)
    app.add_api_route(f"{prefix}/plan", plan, methods=["POST"], **extra)
    app.add_api_route(f"{prefix}/status", status, methods=["GET"], **extra)
    app.add_api_route(f"{prefix}/interrupt", interrupt, methods=["POST"], **extra)
    app.add_api_route(f"{prefix}/results", results, methods=["GET"], **extra)
    app.add_api_route(f"{prefix}/save_now", save_now, methods=["POST"], **extra)
    app.add_api_route(f"{prefix}/sample_now", sample_now, methods=["POST"], **extra)
    app.add_api_route(f"{prefix}/use_best", use_best, methods=["POST"], **extra)
