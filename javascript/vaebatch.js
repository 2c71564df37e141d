// VAE Batch: all globals live in one namespace object, because every extension's JavaScript shares
// one page scope. Hover help for the script's options comes from the argument model: the script
// renders it as JSON in a hidden element (class "vaebatch-help"); here it becomes title attributes.
(function () {
    "use strict";
    var ns = (window.vaebatch = window.vaebatch || {});

    ns.applyHints = function (root) {
        root = root || (typeof gradioApp === "function" ? gradioApp() : document);
        var holders = root.querySelectorAll(".vaebatch-help");
        for (var i = 0; i < holders.length; i++) {
            var holder = holders[i];
            var host = holder.closest("[id]");
            var prefix = host ? host.id.replace(/help$/, "") : "";
            var help;
            try {
                help = JSON.parse(holder.getAttribute("data-help") || "{}");
            } catch (e) {
                continue;
            }
            Object.keys(help).forEach(function (suffix) {
                var el = root.querySelector("#" + prefix + suffix);
                if (!el) {
                    return;
                }
                el.title = help[suffix];
                var targets = el.querySelectorAll("label, span, input, select, .label-wrap");
                for (var j = 0; j < targets.length; j++) {
                    targets[j].title = help[suffix];
                }
            });
        }
    };

    // Latent Batch tab: the webui's own progress bar and task id (as txt2img's submit does).
    ns.submit = function (kind, args) {
        var res = Array.prototype.slice.call(args);
        if (typeof randomId === "function" && typeof requestProgress === "function") {
            var id = randomId();
            var app = gradioApp();
            // no gallery: there are no live previews to show while decoding
            requestProgress(id, app.getElementById("vaebatch_lb_" + kind + "_progress"), null, function () {});
            res[0] = id;
        }
        return res;
    };

    if (typeof onUiLoaded === "function") {
        onUiLoaded(function () {
            ns.applyHints();
        });
    }
    if (typeof onUiUpdate === "function") {
        onUiUpdate(function () {
            ns.applyHints();
        });
    }
})();
