// A small Markdown subset rendered straight to DOM nodes: model output only ever becomes text nodes
// (textContent), never HTML, so it cannot inject markup or script. Supported: fenced code blocks,
// headings, bullet and numbered lists, paragraphs, and inline `code`, **bold** and *emphasis*.
"use strict";
(function () {
  const RT = window.RT || (window.RT = {});

  function inline(parent, text) {
    const pattern = /(`[^`\n]+`|\*\*[^*\n]+\*\*|\*[^*\n]+\*)/g;
    let last = 0, m;
    while ((m = pattern.exec(text)) !== null) {
      if (m.index > last) parent.appendChild(document.createTextNode(text.slice(last, m.index)));
      const tok = m[0];
      if (tok.startsWith("`")) parent.appendChild(RT.el("code", null, tok.slice(1, -1)));
      else if (tok.startsWith("**")) parent.appendChild(RT.el("strong", null, tok.slice(2, -2)));
      else parent.appendChild(RT.el("em", null, tok.slice(1, -1)));
      last = m.index + tok.length;
    }
    if (last < text.length) parent.appendChild(document.createTextNode(text.slice(last)));
  }

  // Renders `text` into `container`, replacing its content. An unclosed code fence (still streaming)
  // renders as a code block up to the end.
  RT.renderMarkdown = function (container, text) {
    container.replaceChildren();
    const lines = text.split("\n");
    let i = 0, para = [];
    const flush = () => {
      if (para.length) { const p = RT.el("p"); inline(p, para.join("\n")); container.appendChild(p); }
      para = [];
    };
    while (i < lines.length) {
      const line = lines[i];
      const fence = line.match(/^\s*```\s*([\w+-]*)/);
      if (fence) {
        flush();
        const code = [];
        i++;
        while (i < lines.length && !/^\s*```/.test(lines[i])) code.push(lines[i++]);
        i++;
        const pre = RT.el("pre");
        const c = RT.el("code", null, code.join("\n"));
        if (fence[1]) c.dataset.lang = fence[1];
        pre.appendChild(c);
        container.appendChild(pre);
        continue;
      }
      const heading = line.match(/^(#{1,4})\s+(.*)$/);
      const item = line.match(/^\s*([-*+]|\d+[.)])\s+(.*)$/);
      if (heading) {
        flush();
        const h = RT.el("h" + (heading[1].length + 2));
        inline(h, heading[2]);
        container.appendChild(h);
      } else if (item) {
        flush();
        const ordered = /\d/.test(item[1]);
        let list = container.lastChild;
        if (!list || list.tagName !== (ordered ? "OL" : "UL")) {
          list = RT.el(ordered ? "ol" : "ul");
          container.appendChild(list);
        }
        const li = RT.el("li");
        inline(li, item[2]);
        list.appendChild(li);
      } else if (!line.trim()) {
        flush();
      } else {
        para.push(line);
      }
      i++;
    }
    flush();
  };
})();
