"""The "LoRA Train" Gradio Blocks: dataset, captions, settings, train, result.

The WebUI tab and the standalone app mount this same Blocks; the host object says what differs (where the
model comes from, where LoRAs go, how a test render is made). Written to the part of Gradio that 3.41 (the
WebUI), 4.x (Forge) and current releases share: plain components with label/info/elem_id, `.click().then()`,
generator handlers for live progress, PIL images rather than file paths (newer Gradio refuses to serve
files from outside its own folders).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from lora_trainer.config import FAMILIES, PRESETS, CaptionConfig, TrainConfig, make_config
from lora_trainer.errors import LoraTrainerError
from lora_trainer.forms import FieldSpec, config_values, form_specs
from lora_trainer.jobs import Trainer, describe

log = logging.getLogger(__name__)

# the few settings that matter up front; everything else is under "Advanced", generated from the config
BASIC = ("output_name", "trigger_word", "epochs", "max_steps", "lora_rank", "learning_rate", "resolution",
         "batch_size")
ALWAYS_HIDDEN = ("train_data_dir", "base_model")  # they have their own boxes on the Dataset tab
# this tab trains image models; language models are trained from the command line (model_type: causal_lm)
IMAGE_UI_SKIPS = {"model_type"} | {s.name for s in form_specs(TrainConfig).values() if s.group == "language model"}
THUMBNAIL = 256
CAPTION_ID = "lora_trainer_caption_"  # element ids of the captioning options (they share names with training keys)
POLL_SECONDS = 1.0


def _named(message: str) -> str:
    """An engine message with each config key it quotes shown as the form's label too."""
    for spec in (*form_specs(TrainConfig).values(), *form_specs(CaptionConfig).values()):
        message = message.replace(f"'{spec.name}'", f"**{spec.label}** (`{spec.name}`)")
    return message


def _component(spec: FieldSpec, value: Any = None, prefix: str = "lora_trainer_") -> gr.components.Component:
    """The Gradio widget of a field's spec, showing `value` (a config value) or else the spec's default."""
    shown = spec.default if value is None else spec.show(value)
    common = {"label": spec.label, "info": spec.help, "elem_id": f"{prefix}{spec.name}"}
    if spec.kind == "choice":
        return gr.Dropdown(choices=[str(c) for c in spec.choices], value=str(shown), **common)
    if spec.kind == "bool":
        return gr.Checkbox(value=bool(shown), **common)
    if spec.kind in ("text", "lines"):
        return gr.Textbox(value=shown, lines=2 if spec.kind == "lines" else 1, **common)
    # no minimum/maximum: Gradio's own range toast does not say which field; the config's check names it
    return gr.Number(value=shown, precision=0 if spec.kind == "int" else None, **common)


def preset_values(family: str, names: list[str]) -> list[Any]:
    """The values the preset fields take for a family ('auto' puts them back to 0 = the model's preset)."""
    specs = form_specs(TrainConfig)
    values = []
    for name in names:
        spec = specs[name]
        if not spec.preset:
            values.append(gr.update())
        elif family in PRESETS:
            value = PRESETS[family][name]
            values.append(str(value) if spec.kind == "choice" else value)
        else:
            values.append(spec.unset)
    return values


def thumbnails(folder: str, caption_extension: str = ".txt") -> tuple[list, list[str]]:
    """(PIL thumbnail, caption) pairs for the caption grid, and the image paths in the same order."""
    from lora_trainer.caption import list_captions
    from lora_trainer.data.images import load_image

    items, paths = [], []
    for path, caption in list_captions(folder, caption_extension):
        try:
            image = load_image(path)
        except (LoraTrainerError, OSError, ValueError) as exc:  # the dataset check lists unreadable images
            log.warning("Cannot show %s: %s", path, exc)
            continue
        image.thumbnail((THUMBNAIL, THUMBNAIL))
        items.append((image, caption or "(no caption)"))
        paths.append(str(path))
    return items, paths


def check_dataset(folder: str, trigger_word: str = "") -> str:
    """The Dataset tab's report: counts, sizes, captions found, problems."""
    from lora_trainer.data import scan_dataset

    if not folder.strip():
        return "Type the folder that holds your training images."
    try:
        scan = scan_dataset(folder.strip(), trigger_word=trigger_word, missing_caption="empty")
    except LoraTrainerError as exc:
        return f"**Problem:** {exc}"
    sizes = sorted({(item.width, item.height) for item in scan.items}, key=lambda s: -s[0] * s[1])
    lines = [f"**{len(scan.items)} usable images** in `{folder.strip()}`",
             f"- sizes: {', '.join(f'{w}x{h}' for w, h in sizes[:6])}{' ...' if len(sizes) > 6 else ''}",
             f"- captions found: {len(scan.items) - len(scan.uncaptioned)} of {len(scan.items)}"]
    if scan.uncaptioned:
        lines.append(f"- without caption: {len(scan.uncaptioned)} (caption them on the Captions tab, or they "
                     "train on the trigger word alone)")
    lines += [f"- skipped `{Path(p).name}`: {reason}" for p, reason in scan.skipped[:20]]
    lines += [f"- converted `{Path(p).name}`: {reason}" for p, reason in scan.converted[:20]]
    return "\n".join(lines)


def build_blocks(host, trainer: Trainer) -> gr.Blocks:
    """The whole tab. `host` is a UiHost (hosts/app.py, hosts/a1111.py); `trainer` runs its jobs."""
    fields = form_specs(TrainConfig)
    caption_fields = form_specs(CaptionConfig)
    hidden = set(ALWAYS_HIDDEN) | set(host.hidden_keys) | IMAGE_UI_SKIPS
    defaults = host.default_values()

    with gr.Blocks(analytics_enabled=False, title="LoRA Trainer") as blocks:
        with gr.Row():
            model_info = gr.Markdown(host.model_line(), elem_id="lora_trainer_model_info")
            refresh_model = gr.Button("Refresh", elem_id="lora_trainer_refresh_model", scale=0)
        with gr.Tabs(elem_id="lora_trainer_tabs"):
            with gr.Tab("1. Dataset", elem_id="lora_trainer_tab_dataset"):
                if host.needs_base_model:
                    base_model = _component(fields["base_model"], defaults.get("base_model"))
                folder = _component(fields["train_data_dir"], defaults.get("train_data_dir"))
                check = gr.Button("Check dataset", elem_id="lora_trainer_check")
                report = gr.Markdown("", elem_id="lora_trainer_dataset_report")

            with gr.Tab("2. Captions", elem_id="lora_trainer_tab_captions") as captions_tab:
                with gr.Row():
                    caption_prefix = _component(caption_fields["prefix"], prefix=CAPTION_ID)
                    caption_existing = _component(caption_fields["existing"], prefix=CAPTION_ID)
                    caption_model = _component(caption_fields["model"], prefix=CAPTION_ID)
                with gr.Accordion("More captioning options", open=False):
                    caption_extra_names = ["prompt", "suffix", "output", "num_beams", "min_length", "max_length",
                                           "batch_size", "device"]
                    caption_extra = [_component(caption_fields[n], prefix=CAPTION_ID) for n in caption_extra_names]
                caption_button = gr.Button("Caption with BLIP", variant="primary", elem_id="lora_trainer_caption")
                caption_status = gr.Markdown("", elem_id="lora_trainer_caption_status")
                image_paths = gr.State([])
                gallery = gr.Gallery(label="Images and captions (click one to edit its caption)", columns=6,
                                     height=420, elem_id="lora_trainer_gallery")
                with gr.Row():
                    selected = gr.Textbox(label="Image", interactive=False, elem_id="lora_trainer_selected")
                    caption_edit = gr.Textbox(label="Caption", lines=2, elem_id="lora_trainer_caption_edit")
                    save_caption = gr.Button("Save caption", elem_id="lora_trainer_save_caption", scale=0)
                with gr.Row():
                    find = gr.Textbox(label="Find", elem_id="lora_trainer_find")
                    replace = gr.Textbox(label="Replace with", elem_id="lora_trainer_replace")
                    regex = gr.Checkbox(label="Regular expression", value=False, elem_id="lora_trainer_regex")
                    replace_button = gr.Button("Replace in all captions", elem_id="lora_trainer_replace_all")
                tags = gr.Dataframe(headers=["tag", "images"], datatype=["str", "number"], interactive=False,
                                    label="Tag frequency", elem_id="lora_trainer_tags")
                show_captions = gr.Button("Reload images and captions", elem_id="lora_trainer_reload_captions")

            with gr.Tab("3. Settings", elem_id="lora_trainer_tab_settings"):
                preset = gr.Dropdown(choices=["auto", *FAMILIES], value="auto", label="Preset",
                                     info="'auto' uses the preset of the model's family; pick one to see and "
                                          "change its values.", elem_id="lora_trainer_preset")
                names, inputs = [], []
                with gr.Row():
                    for name in BASIC:
                        names.append(name)
                        inputs.append(_component(fields[name], defaults.get(name)))
                with gr.Accordion("Advanced", open=False, elem_id="lora_trainer_advanced"):
                    groups: dict[str, list[str]] = {}
                    for name, spec in fields.items():
                        if name not in BASIC and name not in hidden:
                            groups.setdefault(spec.group, []).append(name)
                    for group, members in groups.items():
                        gr.Markdown(f"**{group.capitalize()}**")
                        with gr.Row():
                            for name in members:
                                names.append(name)
                                inputs.append(_component(fields[name], defaults.get(name)))

            with gr.Tab("4. Train", elem_id="lora_trainer_tab_train") as train_tab:
                with gr.Row():
                    train_button = gr.Button("Train", variant="primary", elem_id="lora_trainer_train")
                    interrupt_button = gr.Button("Interrupt", elem_id="lora_trainer_interrupt")
                    watch_button = gr.Button("Show progress", elem_id="lora_trainer_watch")
                    plan_button = gr.Button("Check memory", elem_id="lora_trainer_plan",
                                            visible=hasattr(host, "memory_plan"))
                with gr.Row():
                    save_now = gr.Button("Save now", elem_id="lora_trainer_save_now", scale=0)
                    sample_now = gr.Button("Sample now", elem_id="lora_trainer_sample_now", scale=0)
                    preview_prompt = gr.Textbox(label="Preview prompt", elem_id="lora_trainer_preview_prompt",
                                                info="Sample now renders this with the LoRA as it is (empty: the "
                                                     "sample prompts, else the first caption); the run goes on "
                                                     "exactly as without it.")
                    use_best = gr.Button("Use best", elem_id="lora_trainer_make_best", scale=0)
                memory_plan = gr.Markdown("", elem_id="lora_trainer_memory_plan")
                gr.HTML('<div id="lora_trainer_progress"></div>')  # the WebUI's own progress bar goes here
                task_id = gr.Textbox(visible=False, elem_id="lora_trainer_task_id")
                status = gr.Markdown(describe(trainer.job), elem_id="lora_trainer_status")
                with gr.Row():
                    plot = gr.Image(label="Loss (blue: training; orange: validation)", type="pil", interactive=False,
                                    elem_id="lora_trainer_loss_plot")
                    samples = gr.Image(label="Samples: a row per step, a column per prompt", type="pil",
                                       interactive=False, elem_id="lora_trainer_samples")

            with gr.Tab("5. Result", elem_id="lora_trainer_tab_result"):
                results = gr.Dataframe(headers=["LoRA", "prompt", "size (MB)"], datatype=["str", "str", "number"],
                                       interactive=False, label=f"LoRAs in {host.lora_dir()}",
                                       elem_id="lora_trainer_results")
                with gr.Row():
                    lora_name = gr.Textbox(label="LoRA to test", elem_id="lora_trainer_result_name")
                    refresh_results = gr.Button("Refresh list", elem_id="lora_trainer_refresh_results", scale=0)
                    if host.can_send_to_txt2img:
                        send = gr.Button("Send to txt2img", elem_id="lora_trainer_send_txt2img", scale=0)
                with gr.Row():
                    test_prompt = gr.Textbox(label="Test prompt", elem_id="lora_trainer_test_prompt")
                    test_negative = gr.Textbox(label="Test negative prompt", elem_id="lora_trainer_test_negative")
                with gr.Row():
                    test_strengths = gr.Textbox(label="Test strengths", value="0, 0.5, 1",
                                                elem_id="lora_trainer_test_strengths")
                    test_seed = gr.Number(label="Test seed", value=0, precision=0, elem_id="lora_trainer_test_seed")
                    test_steps = gr.Number(label="Test steps", value=20, precision=0, elem_id="lora_trainer_test_steps")
                    test_size = gr.Number(label="Test size", value=0, precision=0,
                                          info="Image side in pixels; 0 = the resolution the LoRA was trained at.",
                                          elem_id="lora_trainer_test_size")
                    test_button = gr.Button("Test", elem_id="lora_trainer_test")
                test_task = gr.Textbox(visible=False, elem_id="lora_trainer_test_task")
                gr.HTML('<div id="lora_trainer_test_progress"></div>')  # the WebUI's progress bar for the renders
                test_status = gr.Markdown("", elem_id="lora_trainer_test_status")
                test_grid = gr.Image(label="Same prompt and seed at each strength", type="pil", interactive=False,
                                     elem_id="lora_trainer_test_grid")

        base_inputs = [base_model] if host.needs_base_model else []

        # --- handlers (plain functions of the widgets' values; every error becomes a message) ---

        def on_refresh_model():
            return host.model_line()

        def on_check(folder_value, trigger):
            return check_dataset(folder_value, trigger or "")

        def on_show_captions(folder_value):
            from lora_trainer.caption import tag_table

            if not folder_value.strip():
                return [], [], [], "Type the image folder on the Dataset tab first."
            try:
                items, paths = thumbnails(folder_value.strip())
                table = [[tag, count] for tag, count in tag_table(folder_value.strip())[:200]]
            except LoraTrainerError as exc:
                return [], [], [], f"**Problem:** {exc}"
            return items, paths, table, f"{len(paths)} images."

        def with_captions(folder_value, message):
            """A caption handler's outputs: its message, then the grid and tag table as they are now."""
            return (message, *on_show_captions(folder_value)[:3])

        def on_caption(folder_value, prefix, existing, model, *extra):
            from lora_trainer.caption import caption_folder

            values = {"prefix": prefix, "existing": existing, "model": model,
                      **dict(zip(caption_extra_names, extra))}
            try:
                config = make_config(config_values(values, CaptionConfig), CaptionConfig)
                result = host.run_exclusive(lambda: caption_folder(folder_value.strip(), config))
            except LoraTrainerError as exc:
                return with_captions(folder_value, f"**Problem:** {exc}")
            message = f"Captioned {len(result.captioned)} images, kept {len(result.kept)} existing captions"
            if result.skipped:
                message += ", could not read " + ", ".join(Path(p).name for p, _ in result.skipped[:10])
            return with_captions(folder_value, message + ".")

        def on_select(paths, evt: gr.SelectData):
            from lora_trainer.caption import list_captions

            index = evt.index if isinstance(evt.index, int) else evt.index[0]
            if not paths or index >= len(paths):
                return "", ""
            path = Path(paths[index])
            caption = dict(list_captions(path.parent)).get(path, "")
            return str(path), caption

        def on_save_caption(folder_value, image, text):
            from lora_trainer.caption import edit_caption

            if not image:
                return with_captions(folder_value, "Click an image first.")
            try:
                edit_caption(folder_value.strip(), image, text)
            except LoraTrainerError as exc:
                return with_captions(folder_value, f"**Problem:** {exc}")
            return with_captions(folder_value, f"Saved the caption of {Path(image).name}.")

        def on_replace(folder_value, find_value, replace_value, regex_value):
            import re

            from lora_trainer.caption import replace_in_captions

            if not find_value:
                return with_captions(folder_value, "Type what to find.")
            try:
                changed = replace_in_captions(folder_value.strip(), find_value, replace_value, regex=regex_value)
            except (LoraTrainerError, re.error) as exc:
                return with_captions(folder_value, f"**Problem:** {exc}")
            return with_captions(folder_value, f"Changed {changed} captions.")

        def form_values(folder_value, args) -> dict:
            """The config values of the form: the folder, the base model box (the app's), the settings."""
            base = args[:len(base_inputs)]
            values = config_values(dict(zip(names, args[len(base_inputs):])))
            values["train_data_dir"] = folder_value.strip()
            if base:
                values["base_model"] = base[0].strip()
            return values

        def on_train(folder_value, *args):
            try:
                job = trainer.start(form_values(folder_value, args))
            except LoraTrainerError as exc:
                return f"**Not started:** {_named(str(exc))}", ""
            return describe(job), f"task(lora_trainer-{job.id})"

        def on_plan(folder_value, *args):
            """The predicted peak GPU memory of these settings on the loaded model, and what memory: auto picks."""
            try:
                return "```\n" + trainer.memory_plan(form_values(folder_value, args)) + "\n```"
            except LoraTrainerError as exc:
                return f"**Problem:** {_named(str(exc))}"

        def on_follow(task: str):
            """After a Train click: follow the job it started; a refused click keeps its message."""
            if not task:
                yield gr.update(), gr.update(), gr.update(), gr.update()
                return
            yield from on_watch()

        def on_status():
            """The job as it is now (page load): a reloaded page shows the running job, not an empty tab."""
            job = trainer.job
            if job is None:
                return describe(None), None, None, result_rows()
            return describe(job), loss_image(job), sample_image(job), result_rows()

        def on_watch():
            """Stream the job's status until it ends (the page can be closed: training goes on)."""
            shown = -1
            while True:
                job = trainer.job
                if job is None:
                    yield describe(None), None, None, result_rows()
                    return
                count = len(job.losses) + len(job.validation) + len(job.samples)
                changed = count != shown
                shown = count
                yield (describe(job), loss_image(job) if changed else gr.update(),
                       sample_image(job) if changed else gr.update(), result_rows())
                if not job.running:
                    return
                time.sleep(POLL_SECONDS)

        def loss_image(job) -> Image.Image | None:
            from lora_trainer.train.plot import loss_plot

            return loss_plot(job.losses, job.validation) if job.losses or job.validation else None

        def sample_image(job) -> Image.Image | None:
            from lora_trainer.train.plot import sample_grid

            return sample_grid(job.sample_grid[-48:])

        def result_rows() -> list[list]:
            return [[r["name"], r["prompt"], round(r["size"] / 2**20, 2)] for r in trainer.results()] or \
                [["", "", 0]]

        def on_interrupt():
            return describe(trainer.job) if trainer.interrupt() else "Nothing is training."

        def on_save_now():
            return describe(trainer.job) if trainer.save_now() else "Nothing is training."

        def on_sample_now(prompt):
            return describe(trainer.job) if trainer.sample_now(prompt or "") else "Nothing is training."

        def on_use_best():
            try:
                trainer.use_best()
            except LoraTrainerError as exc:
                return f"**Problem:** {_named(str(exc))}", result_rows()
            return describe(trainer.job), result_rows()

        def on_pick_result(rows, evt: gr.SelectData):
            row = evt.index[0] if isinstance(evt.index, (list, tuple)) else 0
            try:
                return rows.values.tolist()[row][0] if hasattr(rows, "values") else rows[row][0]
            except (IndexError, KeyError):
                return ""

        def on_test(name, prompt, negative, strengths, seed, steps, size, task, *args):
            from lora_trainer.ui.render import parse_strengths

            name = (name or (trainer.job.name if trainer.job else "")).strip()
            if not name:
                return "Pick a LoRA from the list or type its name.", None
            if not 1 <= int(steps or 20) <= 150 or int(seed or 0) < 0 or not 0 <= int(size or 0) <= 4096:
                return "**Problem:** Test steps must be 1 to 150, Test seed 0 or more, Test size 0 to 4096.", None
            try:
                weights = parse_strengths(strengths)
                grid = host.run_exclusive(lambda: host.test_grid(
                    name, prompt or "", negative or "", weights, int(seed or 0), int(steps or 20),
                    size=int(size or 0), base_model=args[0].strip() if args else ""), task=task or "")
            except LoraTrainerError as exc:
                return f"**Problem:** {exc}", None
            return f"{name} at strengths {', '.join(f'{w:g}' for w in weights)}.", grid

        # --- wiring ---
        refresh_model.click(on_refresh_model, None, [model_info])
        check.click(on_check, [folder, inputs[names.index("trigger_word")]], [report])
        show_outputs = [gallery, image_paths, tags, caption_status]
        show_captions.click(on_show_captions, [folder], show_outputs)
        captions_tab.select(on_show_captions, [folder], show_outputs)
        caption_button.click(on_caption, [folder, caption_prefix, caption_existing, caption_model, *caption_extra],
                             [caption_status, gallery, image_paths, tags])
        gallery.select(on_select, [image_paths], [selected, caption_edit])
        save_caption.click(on_save_caption, [folder, selected, caption_edit], [caption_status, gallery, image_paths, tags])
        replace_button.click(on_replace, [folder, find, replace, regex], [caption_status, gallery, image_paths, tags])
        preset.change(lambda family: preset_values(family, names), [preset], inputs)
        watch_outputs = [status, plot, samples, results]
        plan_button.click(on_plan, [folder, *base_inputs, *inputs], [memory_plan])
        started = train_button.click(on_train, [folder, *base_inputs, *inputs], [status, task_id])
        # the host's own progress bar (the WebUI's requestProgress) follows the job too, from the same step
        progress_js = getattr(host, "progress_js", None)
        started.then(on_follow, [task_id], watch_outputs, **(_js_kwarg(progress_js) if progress_js else {}))
        watch_button.click(on_watch, None, watch_outputs)
        train_tab.select(on_watch, None, watch_outputs)
        interrupt_button.click(on_interrupt, None, [status])
        save_now.click(on_save_now, None, [status])
        sample_now.click(on_sample_now, [preview_prompt], [status])
        use_best.click(on_use_best, None, [status, results])
        refresh_results.click(result_rows, None, [results])
        results.select(on_pick_result, [results], [lora_name])
        test_inputs = [lora_name, test_prompt, test_negative, test_strengths, test_seed, test_steps, test_size,
                       test_task, *base_inputs]
        test_js = getattr(host, "test_progress_js", None)  # the host's progress bar follows the renders
        test_button.click(on_test, test_inputs, [test_status, test_grid], **(_js_kwarg(test_js) if test_js else {}))
        if host.can_send_to_txt2img:
            js = "(name) => { loraTrainerSendToTxt2img(name); return [name]; }"
            send.click(None, [lora_name], [lora_name], **_js_kwarg(js))
        blocks.load(on_status, None, watch_outputs)
    return blocks


def _js_kwarg(code: str) -> dict[str, str]:
    """Gradio 3 names a client-side handler `_js`, Gradio 4 and later `js`."""
    major = int(gr.__version__.split(".")[0])
    return {"_js": code} if major < 4 else {"js": code}
