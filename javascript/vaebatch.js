// VAE Batch: all globals live in one namespace object, because every extension's JavaScript shares
// one page scope. Hover help for the script's options is registered here by element id (vaebatch-*).
(function () {
    "use strict";
    var ns = (window.vaebatch = window.vaebatch || {});
    ns.hints = ns.hints || {};
})();
