// LoRA Train tab (lora_trainer extension): send a LoRA to txt2img, follow training in the WebUI's progress bar.

function loraTrainerSendToTxt2img(name) {
    if (!name) return;
    const box = gradioApp().querySelector("#txt2img_prompt textarea");
    if (!box) return;
    const tag = "<lora:" + name + ":0.8>";
    if (!box.value.includes("<lora:" + name + ":")) {
        box.value = box.value.trim() ? box.value.trim() + ", " + tag : tag;
        updateInput(box);
    }
    loraTrainerRefreshLoras();
    switch_to_txt2img();
}

function loraTrainerRefreshLoras() {
    // the Lora extra-networks pages re-scan the Lora folder when their hidden refresh button is clicked
    for (const tab of ["txt2img", "img2img"]) {
        const button = gradioApp().getElementById(tab + "_lora_extra_refresh_internal");
        if (button) button.dispatchEvent(new Event("click"));
    }
}

function loraTrainerProgress(task, anchorId) {
    const anchor = gradioApp().getElementById(anchorId || "lora_trainer_progress");
    if (!task || !anchor || typeof requestProgress !== "function") return;
    // the WebUI polls /internal/progress for this task: its bar, ETA and text, until the job ends
    requestProgress(task, anchor, null, loraTrainerRefreshLoras, null, 3600);
}
