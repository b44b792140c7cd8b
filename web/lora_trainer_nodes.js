// ComfyUI: "Save now" and "Sample now" buttons on the Train LoRA node. They call this node pack's server routes,
// which the running training answers between two steps (a checkpoint into models/loras as NAME-stepN; a preview
// of its sample prompts shown on the node). The buttons are not inputs: they are left out of the saved workflow.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

async function askTraining(route, button) {
    const label = button.name;
    try {
        const response = await api.fetchApi(route, { method: "POST", body: "{}" });
        const body = await response.json();
        button.name = response.ok ? label + ": asked" : label + ": " + (body.error || response.statusText);
    } catch (error) {
        button.name = label + ": " + error;
    }
    app.graph.setDirtyCanvas(true, false);
    setTimeout(() => { button.name = label; app.graph.setDirtyCanvas(true, false); }, 3000);
}

app.registerExtension({
    name: "lora_trainer.TrainLoraButtons",
    async beforeRegisterNodeDef(nodeType, nodeData) {
        if (nodeData.name !== "LoraTrainerTrainLora") return;
        const created = nodeType.prototype.onNodeCreated;
        nodeType.prototype.onNodeCreated = function () {
            const result = created ? created.apply(this, arguments) : undefined;
            for (const [label, route] of [["Save now", "/lora_trainer/save_now"],
                                          ["Sample now", "/lora_trainer/sample_now"]]) {
                const button = this.addWidget("button", label, null, () => askTraining(route, button),
                                              { serialize: false });
                button.serialize = false;
            }
            return result;
        };
    },
});
