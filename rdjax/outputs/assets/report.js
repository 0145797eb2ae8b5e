const data = JSON.parse(document.getElementById('data').textContent);
const slider = document.getElementById('threshold');
const cards = Array.from(document.querySelectorAll('.card'));
const names = {tp: 'true positive', fp: 'false positive', tn: 'true negative', fn: 'false negative',
               ng: 'anomalous', ok: 'normal'};
function update() {
  const t = parseFloat(slider.value);
  const counts = data.labels ? {tp: 0, fp: 0, tn: 0, fn: 0} : {ng: 0, ok: 0};
  cards.forEach((card, i) => {
    const anomalous = data.scores[i] >= t;
    const kind = !data.labels ? (anomalous ? 'ng' : 'ok')
      : anomalous ? (data.labels[i] ? 'tp' : 'fp') : (data.labels[i] ? 'fn' : 'tn');
    counts[kind] += 1;
    card.className = 'card ' + kind;
    card.querySelector('.outcome').textContent = (anomalous ? 'NG, ' : 'OK, ') + names[kind];
  });
  for (const k in counts) document.getElementById(k).textContent = counts[k];
  document.getElementById('value').textContent = t.toPrecision(6);
}
// Cards keep their index into data.scores; ordering moves them, the skipped cards stay last.
const order = document.getElementById('order');
function reorder() {
  const rows = cards.map((card, i) => i);
  if (order.value === 'up') rows.sort((a, b) => data.scores[a] - data.scores[b]);
  if (order.value === 'down') rows.sort((a, b) => data.scores[b] - data.scores[a]);
  const box = document.querySelector('.cards');
  rows.forEach(i => box.appendChild(cards[i]));
  document.querySelectorAll('.skipcard').forEach(card => box.appendChild(card));
}
slider.addEventListener('input', update);
order.addEventListener('change', reorder);
update();
