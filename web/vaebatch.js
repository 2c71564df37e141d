// VAE Batch in ComfyUI's front end (served from the pack's web/ folder; A1111 and Forge load only
// javascript/, never this file):
// * "VAE Batch Encode Images" declares image_1 ... image_64; the node shows the connected ones plus
//   one free input after the last connected, so a new input appears as one is connected.
// * The nodes' report (their "ui" text, which ComfyUI shows only for its own Preview Any) is shown
//   on the node in a read-only text box.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const VAEBatch = {
    GROWING: "VAEBatchEncodeImages",
    REPORTING: new Set(["VAEBatchDecode", "VAEBatchEncode", "VAEBatchEncodeImages"]),
    IMAGE: /^image_(\d+)$/,
    MAX_IMAGES: 64,
    REPORT_WIDGET: "vaebatch_report",

    imageNumber(input) {
        const m = VAEBatch.IMAGE.exec(input?.name ?? "");
        return m ? Number(m[1]) : null;
    },

    // Keep every connected image input and one free one after the last connected; add the missing
    // ones up to there (in order), remove the free ones beyond.
    grow(node) {
        if (!node.inputs) return;
        const connected = node.inputs
            .filter((inp) => VAEBatch.imageNumber(inp) !== null && inp.link != null)
            .map((inp) => VAEBatch.imageNumber(inp));
        const last = Math.min(VAEBatch.MAX_IMAGES, (connected.length ? Math.max(...connected) : 0) + 1);
        for (let i = node.inputs.length - 1; i >= 0; i--) {
            const n = VAEBatch.imageNumber(node.inputs[i]);
            if (n !== null && n > last && node.inputs[i].link == null) node.removeInput(i);
        }
        const have = new Set(node.inputs.map((inp) => VAEBatch.imageNumber(inp)).filter((n) => n !== null));
        for (let n = 1; n <= last; n++) {
            if (!have.has(n)) node.addInput(`image_${n}`, "IMAGE");
        }
        node.setSize?.(node.computeSize());
        node.setDirtyCanvas?.(true, true);
    },

    showReport(node, text) {
        let widget = node.widgets?.find((w) => w.name === VAEBatch.REPORT_WIDGET);
        if (!widget) {
            widget = ComfyWidgets.STRING(node, VAEBatch.REPORT_WIDGET, ["STRING", { multiline: true }], app).widget;
            widget.serialize = false; // a display, not an input of the graph
            if (widget.inputEl) {
                widget.inputEl.readOnly = true;
                widget.inputEl.style.opacity = 0.8;
            }
        }
        widget.value = text;
        node.setDirtyCanvas?.(true, true);
    },
};

app.registerExtension({
    name: "vaebatch.nodes",
    async beforeRegisterNodeDef(nodeType, nodeData) {
        if (VAEBatch.REPORTING.has(nodeData.name)) {
            const onExecuted = nodeType.prototype.onExecuted;
            nodeType.prototype.onExecuted = function (message) {
                onExecuted?.apply(this, arguments);
                const text = message?.text;
                if (text !== undefined) VAEBatch.showReport(this, Array.isArray(text) ? text.join("\n") : String(text));
            };
        }
        if (nodeData.name === VAEBatch.GROWING) {
            const onNodeCreated = nodeType.prototype.onNodeCreated;
            nodeType.prototype.onNodeCreated = function () {
                const r = onNodeCreated?.apply(this, arguments);
                // later, not now: a graph being loaded connects its links right after creating the node
                setTimeout(() => VAEBatch.grow(this), 0);
                return r;
            };
            const onConfigure = nodeType.prototype.onConfigure;
            nodeType.prototype.onConfigure = function () {
                const r = onConfigure?.apply(this, arguments);
                setTimeout(() => VAEBatch.grow(this), 0); // after the saved links are restored
                return r;
            };
            const onConnectionsChange = nodeType.prototype.onConnectionsChange;
            nodeType.prototype.onConnectionsChange = function (type, index, connected, link, slot) {
                const r = onConnectionsChange?.apply(this, arguments);
                if (type === 1 /* an input */ && VAEBatch.imageNumber(slot ?? this.inputs?.[index]) !== null) {
                    setTimeout(() => VAEBatch.grow(this), 0); // not while the graph is mid-change
                }
                return r;
            };
        }
    },
});
