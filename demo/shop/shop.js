// ClickShop: a one-page demo shop instrumented with the official @snowplow/browser-tracker.
// Views (hash routes): #/ home, #/c/<category>, #/p/<sku>, #/cart, #/checkout/<step>, #/confirmation.
// It sends the same events as demo/traffic.py: page views with the com.clickshop/page_type context,
// and the com.clickshop self-describing events of docs/contracts.md.
(function () {
  'use strict';

  var sp = window.snowplowBrowserTracking;
  var params = new URLSearchParams(window.location.search);
  var collector = params.get('collector') || window.CLICKSTREAM_COLLECTOR || 'http://127.0.0.1:8080';
  var CURRENCY = 'EUR';
  var STEPS = [null, 'cart', 'shipping', 'payment', 'review'];
  var catalogue = { categories: [], products: [] };
  var view = document.getElementById('view');

  sp.newTracker('sp', collector, {
    appId: 'clickshop', platform: 'web', eventMethod: 'post', bufferSize: 1,
    contexts: { webPage: true }, cookieSameSite: 'Lax', stateStorageStrategy: 'cookieAndLocalStorage',
  });
  sp.enableActivityTracking({ minimumVisitLength: 5, heartbeatDelay: 10 });

  // ---------------------------------------------------------------- tracking

  function pageType(type, category) {
    var data = { type: type };
    if (category) data.category = category;
    return { schema: 'iglu:com.clickshop/page_type/jsonschema/1-0-0', data: data };
  }

  var currentContext = pageType('home');

  function trackPage(title, type, category) {
    document.title = title + ' | ClickShop';
    currentContext = pageType(type, category);
    sp.trackPageView({ title: document.title, context: [currentContext] });
  }

  function track(name, data) {
    sp.trackSelfDescribingEvent({
      event: { schema: 'iglu:com.clickshop/' + name + '/jsonschema/1-0-0', data: data },
      context: [currentContext],
    });
  }

  function showSession() {
    // The domain session id is what the scorer keys its predictions (and the discount engine its offers) by.
    document.getElementById('session-id').textContent = sp.getDomainSessionId('sp') || '(unknown)';
  }

  // ---------------------------------------------------------------- cart (kept in localStorage)

  // For the live regions (cart count, prediction): the same text written again would be read out again.
  function setText(node, text) {
    if (node.textContent !== text) node.textContent = text;
  }

  function cart() { return JSON.parse(localStorage.getItem('clickshop-cart') || '[]'); }
  function saveCart(items) {
    localStorage.setItem('clickshop-cart', JSON.stringify(items));
    setText(document.getElementById('cart-count'), String(items.reduce(function (n, i) { return n + i.quantity; }, 0)));
  }
  function product(sku) { return catalogue.products.find(function (p) { return p.sku === sku; }); }
  function money(value) { return '€' + value.toFixed(2); }
  function cartTotal(items) { return items.reduce(function (t, i) { return t + i.price * i.quantity; }, 0); }

  // ---------------------------------------------------------------- views

  function el(html) { view.innerHTML = html; }

  function productCards(products) {
    return '<div class="grid">' + products.map(function (p) {
      return '<div class="product"><a href="#/p/' + p.sku + '">' + p.name + '</a><div class="price">' +
        money(p.price) + '</div></div>';
    }).join('') + '</div>';
  }

  var views = {
    home: function () {
      el('<h1>Winter sale</h1><p>Our most popular products.</p>' +
        productCards(catalogue.categories.map(function (c) {
          return catalogue.products.find(function (p) { return p.category === c; });
        })));
      trackPage('Home', 'home');
    },
    category: function (category) {
      var title = category.charAt(0).toUpperCase() + category.slice(1);
      el('<h1>' + title + '</h1>' + productCards(catalogue.products.filter(function (p) {
        return p.category === category;
      })));
      trackPage(title, 'category', category);
    },
    product: function (sku) {
      var p = product(sku);
      if (!p) { return views.home(); }
      el('<h1>' + p.name + '</h1><p class="price">' + money(p.price) + '</p>' +
        '<p>Category: <a href="#/c/' + p.category + '">' + p.category + '</a></p>' +
        '<button id="add-to-cart">Add to cart</button>');
      trackPage(p.name, 'product', p.category);
      track('product_view', { sku: p.sku, category: p.category, price: p.price, currency: CURRENCY });
      document.getElementById('add-to-cart').addEventListener('click', function () {
        var items = cart();
        var line = items.find(function (i) { return i.sku === p.sku; });
        if (line) { line.quantity += 1; } else { items.push({ sku: p.sku, category: p.category, price: p.price, quantity: 1 }); }
        saveCart(items);
        track('add_to_cart', { sku: p.sku, category: p.category, price: p.price, quantity: 1, currency: CURRENCY });
        this.textContent = 'Added ✓';
      });
    },
    cart: function () {
      var items = cart();
      el('<h1>Your cart</h1>' + steps(1) + (items.length ? '<table><thead><tr><th scope="col">Product</th>' +
        '<th scope="col">Quantity × price</th><td></td></tr></thead><tbody>' + items.map(function (i) {
        var name = product(i.sku).name;
        return '<tr><th scope="row">' + name + '</th><td>' + i.quantity + ' × ' + money(i.price) +
          '</td><td><button class="secondary remove" data-sku="' + i.sku + '" aria-label="Remove ' + name +
          '">Remove</button></td></tr>';
      }).join('') + '</tbody></table><p>Total ' + money(cartTotal(items)) + '</p><button id="checkout">Checkout</button>'
        : '<p>Your cart is empty.</p>'));
      trackPage('Cart', 'cart');
      if (items.length) track('checkout_step', { step: 1, name: 'cart' });
      view.querySelectorAll('.remove').forEach(function (button) {
        button.addEventListener('click', function () {
          var sku = button.getAttribute('data-sku');
          var line = items.find(function (i) { return i.sku === sku; });
          saveCart(items.filter(function (i) { return i.sku !== sku; }));
          track('remove_from_cart', { sku: line.sku, category: line.category, price: line.price,
                                      quantity: line.quantity, currency: CURRENCY });
          views.cart();
          focusHeading();                          // the button pressed is gone with the old table
        });
      });
      var checkout = document.getElementById('checkout');
      if (checkout) checkout.addEventListener('click', function () { location.hash = '#/checkout/shipping'; });
    },
    checkout: function (name) {
      var step = STEPS.indexOf(name);
      var items = cart();
      if (step < 2 || !items.length) { location.hash = '#/cart'; return; }
      var last = step === 4;
      var fields = {
        shipping: '<label>Address <input name="address" autocomplete="street-address" value="1 Demo Street"></label>',
        payment: '<label>Card number <input name="card" autocomplete="cc-number" inputmode="numeric" ' +
          'value="4242 4242 4242 4242"></label>',
        review: '<p>' + items.length + ' item(s), total ' + money(cartTotal(items)) + '</p>',
      }[name];
      el('<h1>Checkout</h1>' + steps(step) + '<form id="step-form">' + fields + '<p>' +
        (last ? '<button id="place-order">Place order</button>' : '<button id="next">Continue</button>') + '</p></form>');
      trackPage('Checkout: ' + name, 'checkout');
      track('checkout_step', { step: step, name: name });
      // A form, so Enter in a field goes on as the button does; the page itself is never submitted.
      document.getElementById('step-form').addEventListener('submit', function (event) {
        event.preventDefault();
        if (last) placeOrder(); else location.hash = '#/checkout/' + STEPS[step + 1];
      });
    },
    confirmation: function () {
      var order = JSON.parse(sessionStorage.getItem('clickshop-order') || 'null');
      el(order ? '<h1>Thank you!</h1><p id="order-id">Order ' + order.order_id + '</p>' : '<h1>No order</h1>');
      trackPage('Thank you', 'confirmation');
      if (order && !order.tracked) {
        track('purchase', { order_id: order.order_id, total: order.total, items: order.items, currency: CURRENCY });
        order.tracked = true;                      // a reload of the page is not a second purchase
        sessionStorage.setItem('clickshop-order', JSON.stringify(order));
      }
    },
  };

  function steps(current) {
    return '<ol class="steps">' + STEPS.slice(1).map(function (name, i) {
      return i + 1 === current ? '<li aria-current="step"><b>' + name + '</b></li>' : '<li>' + name + '</li>';
    }).join('') + '</ol>';
  }

  function placeOrder() {
    var items = cart();
    var order = {
      order_id: 'ORD-' + Math.random().toString(16).slice(2, 12),
      total: Math.round(cartTotal(items) * 100) / 100,
      items: items.reduce(function (n, i) { return n + i.quantity; }, 0),
    };
    sessionStorage.setItem('clickshop-order', JSON.stringify(order));
    saveCart([]);
    location.hash = '#/confirmation';
  }

  // A view replaces all of <main>: its heading takes the focus, which was on a link or button now gone.
  function focusHeading() {
    var heading = view.querySelector('h1');
    if (!heading) return;
    heading.setAttribute('tabindex', '-1');
    heading.focus();
  }

  function route(event) {
    var parts = (location.hash.replace(/^#\/?/, '') || '').split('/');
    if (parts[0] === 'c' && parts[1]) views.category(parts[1]);
    else if (parts[0] === 'p' && parts[1]) views.product(parts[1]);
    else if (parts[0] === 'cart') views.cart();
    else if (parts[0] === 'checkout') views.checkout(parts[1]);
    else if (parts[0] === 'confirmation') views.confirmation();
    else views.home();
    showSession();
    if (event) focusHeading();                   // a view change, not the page's first view
    window.scrollTo(0, 0);
    document.body.dataset.view = location.hash;   // the view now shown (a test waits for it, not for the hash)
  }

  // ---------------------------------------------------------------- my own prediction

  // Served by the live view under /shop/, the page asks it (same origin) for its own session's
  // latest prediction; ?liveview=<base URL> points elsewhere. Elsewhere the panel stays quiet.
  var liveview = params.get('liveview') ||
    (location.pathname.indexOf('/shop/') === 0 ? location.origin : null);

  function showPrediction(found) {
    if (!found || found.p_buy === null || found.p_buy === undefined) return;
    setText(document.getElementById('p-buy'),
      'p(buy) ' + found.p_buy.toFixed(3) + ' after ' + found.events + ' events (model ' + found.model_version + ')');
    var decision = document.getElementById('p-decision');
    var offer = found.offer && found.offer.code
      ? ', offer ' + found.offer.code + ' (' + found.offer.discount_percent + ' % off)' : '';
    setText(decision, found.decision + offer);
    decision.className = found.decision === 'buy' ? 'buy' : 'defer';
  }

  // Until a score arrives, say why none has: a scorer that is down would otherwise look like a slow one.
  var waiting = {down: 'not scored yet: the scorer is not answering',
                 liveview: 'not scored yet: the live view is not answering'};
  function showWaiting(reason) {
    var shown = document.getElementById('p-buy');
    if (shown.textContent.indexOf('p(buy)') === 0) return;   // a score already shown stays
    setText(shown, waiting[reason] || 'not scored yet');
  }

  function pollPrediction() {
    var sid = sp.getDomainSessionId('sp');
    if (!liveview || !sid) return;
    fetch(liveview + '/api/session/' + encodeURIComponent(sid))
      .then(function (r) {
        return r.json().then(function (body) {
          if (r.ok) showPrediction(body); else showWaiting(body.scorer);
        });
      })
      .catch(function () { showWaiting('liveview'); });     // try again next tick
  }
  setInterval(pollPrediction, 1500);

  document.getElementById('collector').textContent = collector;
  fetch('catalogue.json').then(function (r) { return r.json(); }).then(function (data) {
    catalogue = data;
    document.getElementById('categories').innerHTML = data.categories.map(function (c) {
      return '<a href="#/c/' + c + '" data-nav="' + c + '">' + c + '</a>';
    }).join('');
    saveCart(cart());
    window.addEventListener('hashchange', route);
    route();
  });
})();
