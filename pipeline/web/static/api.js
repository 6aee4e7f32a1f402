"use strict";
(async () => {
  const spec = await getJSON("/openapi.json");
  const list = document.getElementById("paths");
  for (const [path, ops] of Object.entries(spec.paths)) {
    for (const [method, op] of Object.entries(ops)) {
      const li = el("li");
      const head = el("div");
      head.append(el("span", "method", method.toUpperCase()), el("code", "", path));
      li.append(head, el("div", "", op.summary || ""));
      if (op.description) li.append(el("div", "meta", op.description));
      const params = (op.parameters || []).map((p) => `${p.name} (${p.in}${p.required ? ", required" : ""})`);
      if (params.length) li.append(el("div", "meta", "parameters: " + params.join(", ")));
      const body = op.requestBody && op.requestBody.content && op.requestBody.content["application/json"];
      if (body) {
        const ref = body.schema.$ref ? body.schema.$ref.split("/").pop() : "";
        const schema = ref ? spec.components.schemas[ref] : body.schema;
        li.append(el("div", "meta", "JSON body: " + Object.keys(schema.properties || {}).join(", ")));
      }
      list.append(li);
    }
  }
})();
