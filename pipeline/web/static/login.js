"use strict";
const params = new URLSearchParams(location.search);
document.getElementById("next").value = params.get("next") || "/";
document.getElementById("failed").hidden = params.get("failed") !== "1";
